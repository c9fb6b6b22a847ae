package testenv

import (
	"regexp"
	"strings"
)

// MarkdownTable returns the body rows of the first table in doc whose
// header row is header (e.g. "| flag | default | what |"), each as its
// trimmed cells; nil when there is no such table. Tests use it to keep a
// README table and the code it describes the same.
func MarkdownTable(doc, header string) [][]string {
	lines := strings.Split(doc, "\n")
	for i, l := range lines {
		if strings.TrimSpace(l) != header {
			continue
		}
		var rows [][]string
		for _, row := range lines[i+1:] {
			row = strings.TrimSpace(row)
			if !strings.HasPrefix(row, "|") {
				break
			}
			if strings.HasPrefix(row, "|---") || strings.HasPrefix(row, "| ---") {
				continue
			}
			var cells []string
			for _, c := range strings.Split(strings.Trim(row, "|"), " | ") {
				cells = append(cells, strings.TrimSpace(c))
			}
			rows = append(rows, cells)
		}
		return rows
	}
	return nil
}

var codeSpan = regexp.MustCompile("`([^`]*)`")

// CodeSpans are the `code` parts of a Markdown cell, in order.
func CodeSpans(cell string) []string {
	var out []string
	for _, m := range codeSpan.FindAllStringSubmatch(cell, -1) {
		out = append(out, m[1])
	}
	return out
}
