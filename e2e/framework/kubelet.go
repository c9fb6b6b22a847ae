package framework

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/spawn"
)

// Kubelet plays the kubelet (and the scheduler) for one Node: it binds
// unscheduled pods to the node, gives each a network namespace and an
// address, writes the pod's IP and readiness into its status, provides its
// volumes, runs its containers' processes inside the namespace, and tears
// everything down when the pod is deleted. Deployments, ReplicaSets and
// EndpointSlices stay the real controllers' work.
//
// Images name local binaries (Images). Volumes are directories under the
// pod's directory; since the processes share the host's mount namespace,
// a container's mount paths are rewritten to those directories in its
// environment and arguments.
type Kubelet struct {
	Client client.Client
	Node   string
	Dir    string
	// Images maps an image name (without tag) to a binary.
	Images map[string]string
	// ImageFiles are files an image carries, by image name: container path
	// → host file, bind-mounted over the path in the container's private
	// mount namespace (e.g. the CA bundle of the Envoy image).
	ImageFiles map[string]map[string]string
	// ImageCommands are further binaries an image carries, by image name:
	// command name → binary (kubectl exec runs them; other commands are
	// looked up on this host).
	ImageCommands map[string]map[string]string
	// PKI, when set, makes the kubelet serve its API (exec, logs) to the
	// apiserver on GatewayIP:KubeletPort.
	PKI *KubeletPKI
	// SVIDWriter is the svid-writer binary, which provides the
	// spiffe.csi.cert-manager.io volumes; XDSAddr is what it dials.
	SVIDWriter, XDSAddr string
	Logf                func(format string, args ...any)

	net  *network
	mu   sync.Mutex
	pods map[types.UID]*podRun
	seq  int
}

type podRun struct {
	k       *Kubelet
	pod     *corev1.Pod
	id      string
	addr    netip.Addr
	netns   string
	dir     string
	ctx     context.Context
	cancel  context.CancelFunc
	mu      sync.Mutex
	procs   map[string]*proc
	ready   bool
	stopped chan struct{}
	// restarts counts container restarts; exited holds the regular
	// containers that ran to completion (restart policy Never/OnFailure).
	restarts map[string]int
	exited   map[string]error
	// liveFails counts consecutive liveness failures per container.
	liveFails map[string]int
	// readyFails and readyOK are the readiness probes' state per container.
	readyFails map[string]int
	readyOK    map[string]bool
	// stopOnce makes the ordered shutdown run once (deletion or completion).
	stopOnce sync.Once
	// initDone is set (under mu) once the classic init containers ran.
	initDone bool
}

// Run registers the node and runs pods until ctx ends, then stops them all.
func (k *Kubelet) Run(ctx context.Context) error {
	k.pods = map[types.UID]*podRun{}
	if k.Logf == nil {
		k.Logf = func(string, ...any) {}
	}
	// The pod network, as kube-controller-manager --allocate-node-cidrs
	// would set it: the controller reads it for calls to pod IPs.
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: k.Node, Labels: k.nodeLabels()}, Spec: corev1.NodeSpec{PodCIDR: PodCIDR, PodCIDRs: []string{PodCIDR}}}
	if err := k.Client.Create(ctx, node); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	node.Status = corev1.NodeStatus{
		Conditions:      []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
		Addresses:       []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: GatewayIP}, {Type: corev1.NodeHostName, Address: k.Node}},
		Capacity:        corev1.ResourceList{corev1.ResourcePods: resource.MustParse("110")},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: KubeletPort}},
	}
	if err := k.Client.Status().Update(ctx, node); err != nil {
		return fmt.Errorf("node status: %w", err)
	}
	if err := k.serveAPI(ctx); err != nil {
		return err
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			k.stopAll()
			return nil
		case <-tick.C:
		}
		k.sync(ctx)
	}
}

// nodeLabels are the labels of the one node.
func (k *Kubelet) nodeLabels() map[string]string {
	return map[string]string{"kubernetes.io/hostname": k.Node, "topology.kubernetes.io/zone": "zone-a"}
}

// fits is the scheduler's nodeSelector check: the kubelet binds only pods
// its node can take (e.g. the chart's controller Deployment, whose pods are
// kept off this node because the controller runs as a local process).
func (k *Kubelet) fits(p *corev1.Pod) bool {
	labels := k.nodeLabels()
	for key, v := range p.Spec.NodeSelector {
		if labels[key] != v {
			return false
		}
	}
	return true
}

func (k *Kubelet) sync(ctx context.Context) {
	var pods corev1.PodList
	if err := k.Client.List(ctx, &pods); err != nil {
		return
	}
	seen := map[types.UID]bool{}
	for i := range pods.Items {
		p := &pods.Items[i]
		seen[p.UID] = true
		if p.Spec.NodeName == "" && p.DeletionTimestamp == nil {
			if !k.fits(p) {
				continue // a scheduler would leave it Pending
			}
			b := &corev1.Binding{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}, Target: corev1.ObjectReference{Kind: "Node", Name: k.Node}}
			if err := k.Client.SubResource("binding").Create(ctx, p, b); err != nil && !apierrors.IsConflict(err) {
				k.Logf("bind %s/%s: %v", p.Namespace, p.Name, err)
			}
			continue
		}
		if p.Spec.NodeName != k.Node {
			continue
		}
		k.mu.Lock()
		r := k.pods[p.UID]
		if r == nil && p.DeletionTimestamp == nil && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			k.seq++
			r = &podRun{k: k, pod: p.DeepCopy(), id: "p" + strconv.Itoa(k.seq), procs: map[string]*proc{}, stopped: make(chan struct{}),
				restarts: map[string]int{}, exited: map[string]error{}, liveFails: map[string]int{}, readyFails: map[string]int{}, readyOK: map[string]bool{}}
			r.ctx, r.cancel = context.WithCancel(ctx)
			k.pods[p.UID] = r
			go r.run()
		}
		k.mu.Unlock()
		if r != nil && p.DeletionTimestamp != nil {
			go k.terminate(r, p)
		}
	}
	k.mu.Lock()
	for uid, r := range k.pods {
		if !seen[uid] {
			delete(k.pods, uid)
			go r.stop()
		}
	}
	k.mu.Unlock()
}

// terminate stops a deleted pod's processes and removes the pod, as the
// kubelet does once its containers are gone.
func (k *Kubelet) terminate(r *podRun, p *corev1.Pod) {
	k.mu.Lock()
	if k.pods[p.UID] != r {
		k.mu.Unlock()
		return
	}
	delete(k.pods, p.UID)
	k.mu.Unlock()
	r.stop()
	// Retried while the apiserver is away (the fault scenarios kill it):
	// a Pod object left behind keeps its IP in the mesh model after the
	// address went to another pod.
	for attempt := 0; ; attempt++ {
		err := k.Client.Delete(context.Background(), p, client.GracePeriodSeconds(0), client.Preconditions{UID: &p.UID})
		if err == nil || apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return
		}
		if attempt%10 == 0 {
			k.Logf("delete %s/%s: %v (retrying)", p.Namespace, p.Name, err)
		}
		if attempt >= 240 {
			k.Logf("delete %s/%s: giving up after 2m: %v", p.Namespace, p.Name, err)
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (k *Kubelet) stopAll() {
	k.mu.Lock()
	runs := make([]*podRun, 0, len(k.pods))
	for _, r := range k.pods {
		runs = append(runs, r)
	}
	k.pods = map[types.UID]*podRun{}
	k.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range runs {
		wg.Go(r.stop)
	}
	wg.Wait()
}

// Pod returns the run of a pod, or nil.
func (k *Kubelet) pod(ns, name string) *podRun {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, r := range k.pods {
		if r.pod.Namespace == ns && r.pod.Name == name {
			return r
		}
	}
	return nil
}

// Exec returns a command running binary args in the pod's network
// namespace with container's environment, as kubectl exec would.
func (k *Kubelet) Exec(ctx context.Context, ns, pod, container string, args ...string) (*exec.Cmd, error) {
	r := k.pod(ns, pod)
	if r == nil || r.netns == "" {
		return nil, fmt.Errorf("pod %s/%s is not running here", ns, pod)
	}
	for _, c := range r.pod.Spec.Containers {
		if c.Name == container {
			bin, ok := k.Images[imageName(c.Image)]
			if !ok {
				return nil, fmt.Errorf("no binary for image %s", c.Image)
			}
			env := r.env(c)
			// As kubectl exec: the container's user and capabilities apply.
			cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", r.netns}, containerCommand(c, r.hostname(), bin, r.rewrite(c, env, args), k.imageFiles(c.Image))...)...)
			cmd.Env = env
			return cmd, nil
		}
	}
	return nil, fmt.Errorf("pod %s/%s has no container %s", ns, pod, container)
}

// PodDir is the directory of a running pod (its volumes and container logs).
func (k *Kubelet) PodDir(ns, pod string) string {
	if r := k.pod(ns, pod); r != nil {
		return r.dir
	}
	return ""
}

func imageName(image string) string {
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		image = image[:i]
	}
	return image
}

func (r *podRun) logf(format string, args ...any) {
	r.k.Logf("pod %s/%s: "+format, append([]any{r.pod.Namespace, r.pod.Name}, args...)...)
}

func (r *podRun) run() {
	defer close(r.stopped)
	r.addr = r.k.net.alloc()
	var err error
	if r.netns, err = r.k.net.addPod(r.id, r.addr, r.pod.Namespace); err != nil {
		r.logf("network: %v", err)
		r.netns = ""
		return
	}
	r.dir = filepath.Join(r.k.Dir, r.pod.Namespace+"_"+r.pod.Name)
	_ = os.MkdirAll(r.dir, 0o755)
	if err := r.writeStatus(false); err != nil {
		r.logf("status: %v", err)
		return
	}
	if err := r.volumes(); err != nil {
		r.logf("volumes: %v", err)
		return
	}
	// Init containers in order. A restartable one (a native sidecar) keeps
	// running, and the next container starts only once its startup probe
	// passes, as the kubelet does (KEP-753).
	for _, c := range r.pod.Spec.InitContainers {
		if restartable(c) {
			go r.keepRunning(c, true)
			if !r.waitStarted(c) {
				return
			}
			continue
		}
		p, err := r.start(c)
		if err != nil {
			r.logf("init container %s: %v", c.Name, err)
			return
		}
		select {
		case <-p.done:
		case <-r.ctx.Done():
			return
		}
		if p.err != nil {
			r.logf("init container %s failed: %v", c.Name, p.err)
			return
		}
	}
	r.mu.Lock()
	r.initDone = true
	r.mu.Unlock()
	for _, c := range r.pod.Spec.Containers {
		go r.keepRunning(c, false)
	}
	// Readiness and liveness, as the kubelet's prober. The status is
	// rewritten when readiness or a restart count changes.
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	written, containers := false, ""
	for {
		r.liveness()
		ready := r.probe()
		if c := r.containerState(); ready != r.ready || c != containers || !written {
			if err := r.writeStatus(ready); err == nil {
				r.ready, containers, written = ready, c, true
			}
		}
		select {
		case <-r.ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func restartable(c corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

// waitStarted waits until a sidecar's process runs and its startup probe
// (if any) passes; false when the pod stops first.
func (r *podRun) waitStarted(c corev1.Container) bool {
	// Polled faster than the probe's period: the app waits on it.
	for {
		r.mu.Lock()
		p := r.procs[c.Name]
		r.mu.Unlock()
		if p != nil && !p.exited() && (c.StartupProbe == nil || r.check(c.StartupProbe)) {
			return true
		}
		select {
		case <-r.ctx.Done():
			return false
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// keepRunning runs a container and restarts it when it exits, by the pod's
// restartPolicy (sidecars always), until the pod stops. A regular container
// that is not restarted is recorded as exited; when all have, the pod has
// completed: its sidecars are stopped and its phase written.
func (r *podRun) keepRunning(c corev1.Container, sidecar bool) {
	for first := true; r.ctx.Err() == nil; first = false {
		if !first {
			r.mu.Lock()
			r.restarts[c.Name]++
			r.mu.Unlock()
		}
		p, err := r.start(c)
		if err != nil {
			r.logf("container %s: %v", c.Name, err)
		} else {
			<-p.done
			err = p.err
		}
		if r.ctx.Err() != nil {
			return
		}
		if !sidecar {
			policy := r.pod.Spec.RestartPolicy
			if policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && err == nil) {
				r.containerExited(c.Name, err)
				return
			}
		}
		select {
		case <-r.ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (r *podRun) containerExited(name string, err error) {
	r.mu.Lock()
	r.exited[name] = err
	done := len(r.exited) == len(r.pod.Spec.Containers)
	failed := false
	for _, e := range r.exited {
		failed = failed || e != nil
	}
	r.mu.Unlock()
	if !done {
		return
	}
	phase := corev1.PodSucceeded
	if failed {
		phase = corev1.PodFailed
	}
	r.logf("all containers exited: %s", phase)
	go func() {
		r.stop()
		if err := r.writePhase(phase); err != nil {
			r.logf("status: %v", err)
		}
	}()
}

// Restarts is how often the kubelet restarted a container of a running pod.
func (k *Kubelet) Restarts(ns, pod, container string) int {
	r := k.pod(ns, pod)
	if r == nil {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.restarts[container]
}

// proc is a running process; done closes when it has exited (err set).
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	// reaped is set (under mu) once Wait returned: from then on the PID
	// may name another process.
	mu     sync.Mutex
	reaped bool
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// launch starts cmd in its own process group, logging to log, and tracks
// it under name; stop signals the group.
func (r *podRun) launch(name string, cmd *exec.Cmd, log *os.File) (*proc, error) {
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawn.Start(cmd); err != nil {
		log.Close()
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		// Wait for the exit without reaping (the zombie keeps the PID),
		// then mark it reaped under the lock before reaping, so signal never
		// hits a reused PID.
		var info unix.Siginfo
		for {
			if err := unix.Waitid(unix.P_PID, cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil); err != unix.EINTR {
				break
			}
		}
		p.mu.Lock()
		p.reaped = true
		p.mu.Unlock()
		p.err = cmd.Wait()
		log.Close()
		close(p.done)
	}()
	r.mu.Lock()
	r.procs[name] = p
	r.mu.Unlock()
	return p, nil
}

func (r *podRun) start(c corev1.Container) (*proc, error) {
	bin, ok := r.k.Images[imageName(c.Image)]
	if !ok {
		return nil, fmt.Errorf("no binary for image %s", c.Image)
	}
	env := r.env(c)
	args := r.rewrite(c, env, append(slices.Clone(c.Command[min(1, len(c.Command)):]), c.Args...))
	log, err := os.OpenFile(filepath.Join(r.dir, c.Name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	// runc gives the container's user its stdio (fixStdioPermissions), so a
	// process running as another user can open /dev/stdout, as Envoy's
	// access log does.
	if sc := c.SecurityContext; sc != nil && sc.RunAsUser != nil {
		_ = log.Chown(int(*sc.RunAsUser), int(ptr.Deref(sc.RunAsGroup, *sc.RunAsUser)))
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", r.netns}, containerCommand(c, r.hostname(), bin, args, r.k.imageFiles(c.Image))...)...)
	cmd.Env = env
	return r.launch(c.Name, cmd, log)
}

// containerCommand is what runs inside the pod's network namespace: its
// own UTS namespace with the pod's hostname, a private /dev/shm as every
// pod has (Envoy's shared memory must not be shared between sidecars), the
// image's files over their paths, then the binary under the container's
// securityContext where setpriv can enforce it: the user and group, no
// supplementary groups, no privilege escalation, and the capability
// bounding set (Kubernetes' default set minus drop plus add; for trellis-init
// only NET_ADMIN and NET_RAW). `ip netns exec` gives each command its own
// mount namespace, so the tmpfs is private to it.
func containerCommand(c corev1.Container, hostname, bin string, args []string, files map[string]string) []string {
	script := fmt.Sprintf(`hostname %q && mount -t tmpfs -o size=64m,mode=1777 shm /dev/shm`, hostname)
	args = slices.Clone(args)
	for _, path := range slices.Sorted(maps.Keys(files)) {
		if _, err := os.Stat(path); err == nil {
			script += fmt.Sprintf(" && mount --bind %q %q", files[path], path)
			continue
		}
		// Nothing to mount over on this host (e.g. /cert.crt): the
		// arguments naming the path name the file instead.
		for i, a := range args {
			if a == path {
				args[i] = files[path]
			} else if k, v, ok := strings.Cut(a, "="); ok && v == path {
				args[i] = k + "=" + files[path]
			}
		}
	}
	cmd := []string{"unshare", "--uts", "sh", "-c", script + ` && exec "$@"`, "sh"}
	if sc := c.SecurityContext; sc != nil {
		priv := []string{"setpriv"}
		if sc.RunAsUser != nil {
			gid := ptr.Deref(sc.RunAsGroup, *sc.RunAsUser)
			priv = append(priv, fmt.Sprintf("--reuid=%d", *sc.RunAsUser), fmt.Sprintf("--regid=%d", gid), "--clear-groups")
		}
		if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			priv = append(priv, "--no-new-privs")
		}
		if caps := sc.Capabilities; caps != nil {
			priv = append(priv, "--bounding-set="+boundingSet(caps), "--inh-caps=-all")
		}
		if len(priv) > 1 {
			cmd = append(cmd, append(priv, "--")...)
		}
	}
	return append(append(cmd, bin), args...)
}

// defaultCaps are the container runtime's default capabilities (containerd).
var defaultCaps = []string{"chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid", "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill", "audit_write"}

func boundingSet(caps *corev1.Capabilities) string {
	set := map[string]bool{}
	for _, c := range defaultCaps {
		set[c] = true
	}
	for _, d := range caps.Drop {
		if strings.EqualFold(string(d), "ALL") {
			set = map[string]bool{}
			continue
		}
		delete(set, strings.ToLower(strings.TrimPrefix(string(d), "CAP_")))
	}
	for _, a := range caps.Add {
		set[strings.ToLower(strings.TrimPrefix(string(a), "CAP_"))] = true
	}
	out := []string{"-all"}
	for _, c := range slices.Sorted(maps.Keys(set)) {
		out = append(out, "+"+c)
	}
	return strings.Join(out, ",")
}

// env resolves a container's environment: downward-API fields and $(VAR)
// references to earlier variables, as Kubernetes does.
func (r *podRun) env(c corev1.Container) []string {
	vals := map[string]string{}
	out := []string{"PATH=" + os.Getenv("PATH")}
	for _, e := range c.Env {
		v := e.Value
		if f := e.ValueFrom; f != nil && f.FieldRef != nil {
			switch f.FieldRef.FieldPath {
			case "metadata.name":
				v = r.pod.Name
			case "metadata.namespace":
				v = r.pod.Namespace
			case "metadata.uid":
				v = string(r.pod.UID)
			case "status.podIP":
				v = r.addr.String()
			case "spec.serviceAccountName":
				v = r.pod.Spec.ServiceAccountName
			case "spec.nodeName":
				v = r.k.Node
			}
		} else {
			v = expand(v, vals)
		}
		vals[e.Name] = v
		out = append(out, e.Name+"="+v)
	}
	return out
}

// expand replaces $(NAME) with defined variables; $$ is a literal $.
func expand(s string, vals map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' && i+1 < len(s) {
			if s[i+1] == '$' {
				b.WriteByte('$')
				i++
				continue
			}
			if s[i+1] == '(' {
				if j := strings.IndexByte(s[i:], ')'); j > 0 {
					if v, ok := vals[s[i+2:i+j]]; ok {
						b.WriteString(v)
						i += j
						continue
					}
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// rewrite expands $(VAR) in args and maps the container's mount paths to
// the pod's volume directories in args and env (in place).
func (r *podRun) rewrite(c corev1.Container, env []string, args []string) []string {
	vals := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vals[k] = v
	}
	repl := func(s string) string {
		for _, m := range c.VolumeMounts {
			s = strings.ReplaceAll(s, m.MountPath, filepath.Join(r.dir, "volumes", m.Name))
		}
		return s
	}
	for i := range env {
		env[i] = repl(env[i])
	}
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = repl(expand(a, vals))
	}
	return out
}

func (r *podRun) volumes() error {
	for _, v := range r.pod.Spec.Volumes {
		dir := filepath.Join(r.dir, "volumes", v.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		switch {
		case v.Projected != nil:
			for _, src := range v.Projected.Sources {
				if t := src.ServiceAccountToken; t != nil {
					if err := r.token(dir, t); err != nil {
						return err
					}
					go r.refreshToken(dir, t)
				}
			}
		case v.ConfigMap != nil:
			if err := r.configMap(dir, v.ConfigMap.Name, true); err != nil {
				return err
			}
			go func() {
				for r.ctx.Err() == nil {
					select {
					case <-r.ctx.Done():
					case <-time.After(2 * time.Second):
						_ = r.configMap(dir, v.ConfigMap.Name, false)
					}
				}
			}()
		case v.CSI != nil && v.CSI.Driver == "spiffe.csi.cert-manager.io":
			if err := r.svid(dir); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *podRun) token(dir string, t *corev1.ServiceAccountTokenProjection) error {
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         []string{t.Audience},
		ExpirationSeconds: t.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: r.pod.Name, UID: r.pod.UID},
	}}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: r.pod.Namespace, Name: cmp.Or(r.pod.Spec.ServiceAccountName, "default")}}
	var err error
	for range 50 { // the ServiceAccount may still be on its way
		if err = r.k.Client.SubResource("token").Create(r.ctx, sa, tr); err == nil {
			return writeAtomic(filepath.Join(dir, t.Path), []byte(tr.Status.Token))
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("token for %s: %w", sa.Name, err)
}

func (r *podRun) refreshToken(dir string, t *corev1.ServiceAccountTokenProjection) {
	every := time.Duration(ptr.Deref(t.ExpirationSeconds, 3600)) * time.Second * 8 / 10
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(every):
			if err := r.token(dir, t); err != nil {
				r.logf("refresh token: %v", err)
			}
		}
	}
}

func (r *podRun) configMap(dir, name string, wait bool) error {
	var cm corev1.ConfigMap
	deadline := time.Now().Add(time.Minute)
	for {
		err := r.k.Client.Get(r.ctx, client.ObjectKey{Namespace: r.pod.Namespace, Name: name}, &cm)
		if err == nil {
			break
		}
		if !wait || time.Now().After(deadline) || r.ctx.Err() != nil {
			return fmt.Errorf("configmap %s: %w", name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for k, v := range cm.Data {
		if old, err := os.ReadFile(filepath.Join(dir, k)); err == nil && string(old) == v {
			continue
		}
		if err := writeAtomic(filepath.Join(dir, k), []byte(v)); err != nil {
			return err
		}
	}
	return nil
}

// svid starts the svid-writer for the pod and waits for its first files.
func (r *podRun) svid(dir string) error {
	var tokenFile, caFile string
	for _, v := range r.pod.Spec.Volumes {
		switch {
		case v.Projected != nil:
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					tokenFile = filepath.Join(r.dir, "volumes", v.Name, s.ServiceAccountToken.Path)
				}
			}
		case v.ConfigMap != nil:
			caFile = filepath.Join(r.dir, "volumes", v.Name, "root-cert.pem")
		}
	}
	// Nodes are told apart by type: the pod's own gRPC library connects as
	// grpc~..., the writer as sidecar~... (it only asks for secrets).
	node := fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", r.addr, r.pod.Name, r.pod.Namespace, r.pod.Namespace)
	log, err := os.OpenFile(filepath.Join(r.dir, "svid-writer.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", r.netns, r.k.SVIDWriter, "--xds", r.k.XDSAddr, "--ca", caFile, "--token", tokenFile, "--node", node, "--out", dir)
	if _, err := r.launch("svid-writer", cmd, log); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && r.ctx.Err() == nil {
		if _, err := os.Stat(filepath.Join(dir, "tls.crt")); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no SVID after a minute; see %s", log.Name())
}

// probe is the pod's readiness: every container running (sidecars too)
// and its readiness probe passing.
func (r *podRun) probe() bool {
	var cs []corev1.Container
	for _, c := range r.pod.Spec.InitContainers {
		if restartable(c) {
			cs = append(cs, c)
		}
	}
	for _, c := range append(cs, r.pod.Spec.Containers...) {
		r.mu.Lock()
		pr := r.procs[c.Name]
		r.mu.Unlock()
		if pr == nil || pr.exited() {
			return false
		}
		if p := c.ReadinessProbe; p != nil && !r.readyByProbe(c.Name, p) {
			return false
		}
	}
	return true
}

// readyByProbe applies a readiness probe as the kubelet does: ready after
// a success, unready only after failureThreshold (default 3) failures in a
// row, so one slow answer on a loaded machine does not pull the endpoint.
func (r *podRun) readyByProbe(name string, p *corev1.Probe) bool {
	if r.check(p) {
		r.readyFails[name] = 0
		r.readyOK[name] = true
	} else if r.readyFails[name]++; r.readyFails[name] >= int(cmp.Or(p.FailureThreshold, 3)) {
		r.readyOK[name] = false
	}
	return r.readyOK[name]
}

// liveness restarts a container whose liveness probe failed
// failureThreshold times in a row (the probe loop runs every 500 ms; the
// probe's period is not honoured finer than that).
func (r *podRun) liveness() {
	for _, c := range r.pod.Spec.Containers {
		p := c.LivenessProbe
		if p == nil {
			continue
		}
		r.mu.Lock()
		pr := r.procs[c.Name]
		r.mu.Unlock()
		if pr == nil || pr.exited() {
			continue
		}
		if r.check(p) {
			r.liveFails[c.Name] = 0
			continue
		}
		r.liveFails[c.Name]++
		if r.liveFails[c.Name] >= int(max(p.FailureThreshold, 1)) {
			r.logf("container %s failed its liveness probe %d times: restarting it", c.Name, r.liveFails[c.Name])
			r.liveFails[c.Name] = 0
			pr.signal(syscall.SIGKILL)
		}
	}
}

// check runs one probe from the host against the pod's IP, as the kubelet.
func (r *podRun) check(p *corev1.Probe) bool {
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	switch {
	case p.TCPSocket != nil:
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(r.addr.String(), p.TCPSocket.Port.String()), timeout)
		if err != nil {
			return false
		}
		conn.Close()
	case p.HTTPGet != nil:
		hc := http.Client{Timeout: timeout}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
			hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} // as the kubelet
		}
		resp, err := hc.Get(fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(r.addr.String(), p.HTTPGet.Port.String()), p.HTTPGet.Path))
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return false
		}
	}
	return true
}

func (r *podRun) writeStatus(ready bool) error {
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
	}
	for range 20 {
		var p corev1.Pod
		if err := r.k.Client.Get(r.ctx, client.ObjectKeyFromObject(r.pod), &p); err != nil {
			return err
		}
		if p.UID != r.pod.UID {
			return fmt.Errorf("pod was replaced")
		}
		p.Status.Phase = corev1.PodRunning
		p.Status.HostIP, p.Status.HostIPs = GatewayIP, []corev1.HostIP{{IP: GatewayIP}}
		p.Status.PodIP, p.Status.PodIPs = r.addr.String(), []corev1.PodIP{{IP: r.addr.String()}}
		if p.Status.StartTime == nil {
			now := metav1.Now()
			p.Status.StartTime = &now
		}
		p.Status.Conditions = []corev1.PodCondition{
			cond(corev1.PodScheduled, true), cond(corev1.PodInitialized, true),
			cond(corev1.ContainersReady, ready), cond(corev1.PodReady, ready),
		}
		p.Status.InitContainerStatuses, p.Status.ContainerStatuses = r.containerStatuses(ready, p.Status.StartTime)
		err := r.k.Client.Status().Update(r.ctx, &p)
		if err == nil {
			r.pod.Status = p.Status
			return nil
		}
		if !apierrors.IsConflict(err) {
			return err
		}
	}
	return fmt.Errorf("status: too many conflicts")
}

// containerStatuses are what a kubelet reports per container, so that
// kubectl get pods reads as on a cluster (READY, RESTARTS): running or not,
// ready (a regular container: running and the pod ready; a sidecar: running
// past its startup probe), restart count.
func (r *podRun) containerStatuses(ready bool, started *metav1.Time) (initStatuses, statuses []corev1.ContainerStatus) {
	r.mu.Lock()
	defer r.mu.Unlock()
	status := func(c corev1.Container, sidecar bool) corev1.ContainerStatus {
		p := r.procs[c.Name]
		running := p != nil && !p.exited()
		st := corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: c.Image, ContainerID: "e2e://" + r.id + "/" + c.Name,
			RestartCount: int32(r.restarts[c.Name]), Started: &running,
			Ready: running && (sidecar || ready),
		}
		switch err, done := r.exited[c.Name]; {
		case running:
			st.State.Running = &corev1.ContainerStateRunning{StartedAt: *started}
		case done && err == nil:
			st.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}
		default:
			st.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
		}
		return st
	}
	for _, c := range r.pod.Spec.InitContainers {
		if restartable(c) {
			initStatuses = append(initStatuses, status(c, true))
			continue
		}
		st := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: c.Image, ContainerID: "e2e://" + r.id + "/" + c.Name}
		if r.initDone {
			st.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}
		} else {
			st.State.Waiting = &corev1.ContainerStateWaiting{Reason: "PodInitializing"}
		}
		initStatuses = append(initStatuses, st)
	}
	for _, c := range r.pod.Spec.Containers {
		statuses = append(statuses, status(c, false))
	}
	return initStatuses, statuses
}

// containerState sums up what the container statuses report: restarts and
// running containers (a change rewrites the status).
func (r *podRun) containerState() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	restarts, running := 0, 0
	for _, v := range r.restarts {
		restarts += v
	}
	for _, p := range r.procs {
		if !p.exited() {
			running++
		}
	}
	return fmt.Sprint(restarts, "/", running)
}

// writePhase records that the pod ran to completion.
func (r *podRun) writePhase(phase corev1.PodPhase) error {
	for range 20 {
		var p corev1.Pod
		if err := r.k.Client.Get(context.Background(), client.ObjectKeyFromObject(r.pod), &p); err != nil {
			return err
		}
		p.Status.Phase = phase
		for i := range p.Status.Conditions {
			if t := p.Status.Conditions[i].Type; t == corev1.PodReady || t == corev1.ContainersReady {
				p.Status.Conditions[i].Status = corev1.ConditionFalse
			}
		}
		err := r.k.Client.Status().Update(context.Background(), &p)
		if !apierrors.IsConflict(err) {
			return err
		}
	}
	return fmt.Errorf("status: too many conflicts")
}

// stop ends the pod as the kubelet does: SIGTERM to the regular
// containers, then — once they have exited or the grace period (at most
// 10 s here) is over — to the sidecars in reverse order, SIGKILL to what is
// left; then the network namespace goes. It runs once.
func (r *podRun) stop() {
	r.stopOnce.Do(r.shutdown)
}

func (r *podRun) shutdown() {
	r.cancel()
	<-r.stopped
	grace := time.Duration(min(ptr.Deref(r.pod.Spec.TerminationGracePeriodSeconds, 30), 10)) * time.Second
	deadline := time.Now().Add(grace)
	var regular, sidecars []string
	for _, c := range r.pod.Spec.Containers {
		regular = append(regular, c.Name)
	}
	for i := len(r.pod.Spec.InitContainers) - 1; i >= 0; i-- {
		if c := r.pod.Spec.InitContainers[i]; restartable(c) {
			sidecars = append(sidecars, c.Name)
		}
	}
	r.mu.Lock()
	var others []string
	for name := range r.procs {
		if !slices.Contains(regular, name) && !slices.Contains(sidecars, name) {
			others = append(others, name)
		}
	}
	r.mu.Unlock()
	r.preStop(regular, deadline)
	r.terminate(regular, deadline)
	for _, name := range sidecars {
		sidecarDeadline := deadline.Add(5 * time.Second)
		r.preStop([]string{name}, sidecarDeadline)
		r.terminate([]string{name}, sidecarDeadline)
	}
	r.terminate(others, time.Now())
	if r.netns != "" {
		r.k.net.delPod(r.netns)
		r.k.net.release(r.addr)
	}
}

// preStop runs the named containers' preStop hooks, in parallel, until
// they end or deadline passes. Only the sleep action is run (the one the
// injector uses); the kubelet's other actions are not implemented here.
func (r *podRun) preStop(names []string, deadline time.Time) {
	var longest time.Duration
	for _, c := range slices.Concat(r.pod.Spec.Containers, r.pod.Spec.InitContainers) {
		if !slices.Contains(names, c.Name) || c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
			continue
		}
		r.mu.Lock()
		p := r.procs[c.Name]
		r.mu.Unlock()
		if p == nil {
			continue
		}
		select {
		case <-p.done: // the hook is not run for a container that has exited
			continue
		default:
		}
		longest = max(longest, time.Duration(c.Lifecycle.PreStop.Sleep.Seconds)*time.Second)
	}
	if wait := min(longest, time.Until(deadline)); wait > 0 {
		time.Sleep(wait)
	}
}

// terminate sends the named processes' groups SIGTERM, waits for them until
// deadline, then SIGKILLs them. A process that has already exited is left
// alone: its PID (and group id) may already belong to another pod's
// process.
func (r *podRun) terminate(names []string, deadline time.Time) {
	var procs []*proc
	r.mu.Lock()
	for _, n := range names {
		if p := r.procs[n]; p != nil {
			procs = append(procs, p)
		}
	}
	r.mu.Unlock()
	for _, p := range procs {
		p.signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		select {
		case <-p.done:
		case <-time.After(time.Until(deadline)):
		}
		p.signal(syscall.SIGKILL)
		<-p.done
	}
}

// signal sends sig to the process's group while the process runs. Wait
// has not reaped it then, so its PID cannot have been reused.
func (p *proc) signal(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.reaped {
		_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	}
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func (k *Kubelet) imageFiles(image string) map[string]string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return maps.Clone(k.ImageFiles[imageName(image)])
}

// DialPod opens a TCP connection from inside a pod's network namespace (as
// a process in the pod would, e.g. to Envoy's admin on 127.0.0.1:15000).
// The dialling thread enters the namespace and is discarded afterwards.
func (k *Kubelet) DialPod(ctx context.Context, ns, pod, addr string) (net.Conn, error) {
	r := k.pod(ns, pod)
	if r == nil || r.netns == "" {
		return nil, fmt.Errorf("pod %s/%s is not running here", ns, pod)
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, so no other
		// goroutine runs in the pod's namespace.
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", r.netns))
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns %s: %w", r.netns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		ch <- result{c, err}
	}()
	res := <-ch
	return res.c, res.err
}

// EnvoyAdmin GETs a path of the pod's sidecar admin (127.0.0.1:15000).
func (k *Kubelet) EnvoyAdmin(ctx context.Context, ns, pod, path string) ([]byte, error) {
	hc := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return k.DialPod(ctx, ns, pod, "127.0.0.1:15000")
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:15000"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("admin %s: %d", path, resp.StatusCode)
	}
	return b, err
}

// PID is the process id of a running container (its process group leader:
// the container's own binary once the wrappers have exec'd it), or 0.
func (k *Kubelet) PID(ns, pod, container string) int {
	r := k.pod(ns, pod)
	if r == nil {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.procs[container]; p != nil && !p.exited() {
		return p.cmd.Process.Pid
	}
	return 0
}
