package xds

import (
	"testing"
	"time"
)

// TestDebouncer checks istiod's debounce rules: a round is due after the
// quiet period following the last event, and at the latest the max delay
// after the first event even while events keep coming.
func TestDebouncer(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	tests := []struct {
		name   string
		events []int // ms
		check  int   // ms
		want   bool
	}{
		{"nothing pending is never due", nil, 10_000, false},
		{"not due inside the quiet period", []int{0}, 99, false},
		{"due when the quiet period ends", []int{0}, 100, true},
		{"a new event restarts the quiet period", []int{0, 80}, 150, false},
		{"and is due 100 ms after it", []int{0, 80}, 180, true},
		{"a steady stream is due at the max delay", []int{0, 90, 180, 270, 360, 450, 540, 630, 720, 810, 900, 990}, 1000, true},
		{"but not before", []int{0, 90, 180, 270, 360, 450, 540, 630, 720, 810, 900, 990}, 999, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &debouncer{quiet: 100 * time.Millisecond, max: time.Second}
			for _, e := range tt.events {
				d.add(at(e))
			}
			if got := d.due(at(tt.check)); got != tt.want {
				t.Errorf("due at %d ms = %v, want %v (deadline %v)", tt.check, got, tt.want, d.deadline().Sub(t0))
			}
		})
	}
	d := &debouncer{quiet: 100 * time.Millisecond, max: time.Second}
	d.add(at(0))
	if !d.due(at(100)) || d.due(at(200)) {
		t.Error("a round must be consumed once it is due")
	}
	d.add(at(5000))
	if d.first != at(5000) {
		t.Error("a new round must start its max delay at its own first event")
	}
}
