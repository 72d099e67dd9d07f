// Command dsipam-cni is dsipam's CNI IPAM plugin, compiled: ADD, DEL, CHECK, VERSION, GC and
// STATUS turned into dsipam gRPC calls. It behaves as the Python plugin in
// clients/cni/dsipam/cni does (the same configuration, results, error codes and messages), and
// saves that plugin's ~10 ms of interpreter start and imports on every pod's ADD. Build it with
// scripts/build-cni; install it with `dsipam-cni install --compiled BINARY DIR`.
package main

import (
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
)

// CNI error codes (CNI spec, "Error codes") and dsipam's own (100 and up).
const (
	incompatibleVersion = 1
	invalidEnvironment  = 4
	decodeFailure       = 6
	invalidConfig       = 7
	tryAgainLater       = 11
	notAvailable        = 50
	poolExhausted       = 100
	addressInUse        = 101
	poolNotFound        = 102
	allocationNotFound  = 103
	allocationMismatch  = 104
	notAuthorized       = 106
	serverError         = 110
)

const validAttachments = "cni.dev/valid-attachments"
const attachmentsAlias = "cni.dev/attachments"

// Attributes recorded with each allocation.
const (
	attrContainer = "cni.containerID"
	attrIfname    = "cni.ifname"
	attrNetwork   = "cni.network"
	attrNode      = "cni.node"
)

var k8sArgs = []struct{ arg, attribute string }{
	{"K8S_POD_NAMESPACE", "k8s.namespace"}, {"K8S_POD_NAME", "k8s.pod"}, {"K8S_POD_UID", "k8s.podUID"}}

var commands = []string{"ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"}

var requiredEnv = map[string][]string{
	"ADD":   {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"},
	"CHECK": {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"},
	"DEL":   {"CNI_CONTAINERID", "CNI_IFNAME"},
}

// The first spec version that has each command.
var since = map[string][]int{"CHECK": {0, 4, 0}, "GC": {1, 1, 0}, "STATUS": {1, 1, 0}}

// cniError is what the plugin prints as CNI error JSON and exits 1 with.
type cniError struct {
	code    int
	msg     string
	details string
}

func (e *cniError) toJSON(version string) object {
	out := object{{"cniVersion", version}, {"code", e.code}, {"msg", e.msg}}
	if e.details != "" {
		out = append(out, kv{"details", e.details})
	}
	return out
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "dsipam-cni (compiled) is the CNI IPAM plugin: a container runtime runs it with "+
			"CNI_COMMAND set and no arguments. Install it with: dsipam-cni install --compiled "+os.Args[0]+" DIR")
		os.Exit(2)
	}
	stdin, err := io.ReadAll(io.LimitReader(os.Stdin, maxConfig+1))
	if err != nil {
		stdin = nil
	}
	environ := map[string]string{}
	for _, item := range os.Environ() {
		if i := strings.IndexByte(item, '='); i > 0 {
			environ[item[:i]] = item[i+1:]
		}
	}
	code, out := run(environ, stdin)
	if out != "" {
		os.Stdout.WriteString(out + "\n")
	}
	os.Exit(code)
}

// maxConfig bounds the network configuration read from stdin: a runtime's is a few KiB, and a
// GC list of the largest request the server takes (512 KiB) is far below this. Decoded, 4 MiB
// of the worst JSON (a list of one-digit numbers) takes 172 MB of RSS and 0.43 s.
const maxConfig = 4 << 20

// run is one plugin invocation: (exit code, stdout text).
func run(environ map[string]string, stdin []byte) (code int, out string) {
	version := latestVersion
	defer func() {
		if r := recover(); r != nil {
			err := &cniError{code: 999, msg: fmt.Sprintf("internal error: %v", r)}
			code, out = 1, dumps(err.toJSON(version))
		}
	}()
	result, err := dispatch(environ, stdin, &version)
	if err != nil {
		return 1, dumps(err.toJSON(version))
	}
	if result == nil {
		return 0, ""
	}
	return 0, dumps(result)
}

// envChecked are the variables the plugin reads; each must be UTF-8 (a name, an address, an ID).
var envChecked = []string{"CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS", "K8S_NODE_NAME"}

func dispatch(environ map[string]string, stdin []byte, version *string) (interface{}, *cniError) {
	for _, name := range envChecked {
		if !utf8.ValidString(environ[name]) {
			return nil, &cniError{code: invalidEnvironment, msg: name + ": not valid UTF-8"}
		}
	}
	command := environ["CNI_COMMAND"]
	if command == "" {
		return nil, &cniError{code: invalidEnvironment, msg: "CNI_COMMAND: required"}
	}
	known := false
	for _, c := range commands {
		known = known || c == command
	}
	if !known {
		return nil, &cniError{code: invalidEnvironment, msg: "CNI_COMMAND: unknown command " + pyRepr(command),
			details: "expected one of " + strings.Join(commands, ", ")}
	}
	if command == "VERSION" {
		versions := make([]interface{}, len(supportedVersions))
		for i, v := range supportedVersions {
			versions[i] = v
		}
		return object{{"cniVersion", *version}, {"supportedVersions", versions}}, nil
	}
	for _, name := range requiredEnv[command] {
		if environ[name] == "" {
			return nil, &cniError{code: invalidEnvironment, msg: name + ": required for " + command}
		}
	}
	if len(stdin) > maxConfig {
		return nil, &cniError{code: decodeFailure, msg: "network configuration on stdin: larger than 4 MiB"}
	}
	decoded, derr := decodeJSON(stdin)
	if derr != nil {
		return nil, &cniError{code: decodeFailure, msg: "network configuration on stdin: " + derr.Error()}
	}
	netconf, _ := decoded.(map[string]interface{})
	if v, ok := netconf["cniVersion"].(string); ok && v != "" {
		*version = v
	}
	cfg, err := parseConfig(decoded, environ)
	if err != nil {
		return nil, err
	}
	if want, ok := since[command]; ok && versionBefore(cfg.cniVersion, want...) {
		return nil, &cniError{code: incompatibleVersion,
			msg:     fmt.Sprintf("cniVersion: %s does not have %s", cfg.cniVersion, command),
			details: fmt.Sprintf("%s needs cniVersion %d.%d.%d or later", command, want[0], want[1], want[2])}
	}
	if _, ok := requiredEnv[command]; ok {
		if problem := containerIDProblem(environ["CNI_CONTAINERID"]); problem != "" {
			return nil, &cniError{code: invalidEnvironment, msg: "CNI_CONTAINERID: " + problem}
		}
		if problem := ifnameProblem(environ["CNI_IFNAME"]); problem != "" {
			return nil, &cniError{code: invalidEnvironment, msg: "CNI_IFNAME: " + problem}
		}
	}
	switch command {
	case "ADD":
		return cmdAdd(cfg, netconf, environ)
	case "DEL":
		return nil, cmdDel(cfg, environ)
	case "CHECK":
		return nil, cmdCheck(cfg, netconf, environ)
	case "GC":
		return nil, cmdGC(cfg, netconf)
	}
	return nil, cmdStatus(cfg)
}

func isAlnum(c rune) bool {
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
}

// containerIDProblem is what is wrong with a container ID by the spec's rule, or "".
func containerIDProblem(id string) string {
	if id == "" {
		return "required"
	}
	for i, c := range id {
		if !isAlnum(c) && (i == 0 || !strings.ContainsRune("_.-", c)) {
			return pyRepr(cut(id, 80)) + " must be alphanumeric, then alphanumerics, '_', '.' or '-'"
		}
	}
	return ""
}

// ifnameProblem is what is wrong with an interface name by the spec's rule, or "".
func ifnameProblem(ifname string) string {
	if ifname == "" {
		return "required"
	}
	bad := len([]rune(ifname)) > 15 || ifname == "." || ifname == ".."
	for _, c := range ifname {
		bad = bad || c == '/' || c == ':' || unicode.IsSpace(c) || (c >= 0x1c && c <= 0x1f)
	}
	if bad {
		return pyRepr(cut(ifname, 80)) + " is not a valid interface name"
	}
	return ""
}

func ownerOf(containerID, ifname string) string {
	return containerID + "/" + ifname
}

// parseCNIArgs reads CNI_ARGS K=V;K2=V2.
func parseCNIArgs(text string) (map[string]string, *cniError) {
	out := map[string]string{}
	for _, pair := range strings.Split(text, ";") {
		if pair == "" {
			continue
		}
		i := strings.IndexByte(pair, '=')
		if i <= 0 {
			return nil, &cniError{code: invalidEnvironment, msg: "CNI_ARGS: " + pyRepr(cut(pair, 80)) + " is not KEY=VALUE"}
		}
		out[pair[:i]] = pair[i+1:]
	}
	return out, nil
}

// requestedAddresses are the static addresses: ipam.addresses, runtimeConfig.ips, args.cni.ips
// and CNI_ARGS IP=.
func requestedAddresses(cfg *ipamConfig, netconf map[string]interface{}, cniArgs map[string]string) ([]string, *cniError) {
	type found struct {
		where string
		value interface{}
	}
	var all []found
	for i, a := range cfg.addresses {
		all = append(all, found{fmt.Sprintf("ipam.addresses[%d]", i), a})
	}
	if runtime, ok := netconf["runtimeConfig"].(map[string]interface{}); ok {
		if ips, ok := runtime["ips"].([]interface{}); ok {
			for i, a := range ips {
				all = append(all, found{fmt.Sprintf("runtimeConfig.ips[%d]", i), a})
			}
		}
	}
	if args, ok := netconf["args"].(map[string]interface{}); ok {
		if cni, ok := args["cni"].(map[string]interface{}); ok {
			if ips, ok := cni["ips"].([]interface{}); ok {
				for i, a := range ips {
					all = append(all, found{fmt.Sprintf("args.cni.ips[%d]", i), a})
				}
			}
		}
	}
	if ips := cniArgs["IP"]; ips != "" {
		for _, a := range strings.Split(ips, ",") {
			if a = pyStrip(a); a != "" {
				all = append(all, found{"CNI_ARGS IP", a})
			}
		}
	}
	var out []string
	for _, item := range all {
		text, isString := item.value.(string)
		if !isString {
			return nil, bad(item.where, "must be a string, not "+kind(item.value))
		}
		address := requestedAddress(text)
		if address == "" {
			code := invalidConfig
			if item.where == "CNI_ARGS IP" {
				code = invalidEnvironment
			}
			return nil, &cniError{code: code, msg: item.where + ": " + pyRepr(cut(text, 80)) + " is not an IP address"}
		}
		dup := false
		for _, have := range out {
			dup = dup || have == address
		}
		if !dup {
			out = append(out, address)
		}
	}
	return out, nil
}

// fromRPC maps a failed dsipam call to the CNI error to print: msg is the gRPC message;
// details names the status, the ErrorInfo reason and the call.
func fromRPC(e *rpcError, method, endpoint string) *cniError {
	details := fmt.Sprintf("dsipam %s at %s: %s", method, endpoint, codeName(e.code))
	if e.reason != "" {
		details += " (" + e.reason + ")"
	}
	var code int
	switch {
	case e.code == codes.Unavailable || e.code == codes.DeadlineExceeded || e.code == codes.Aborted || e.code == codes.Canceled:
		code = tryAgainLater
	case e.reason == "POOL_EXHAUSTED" || (e.code == codes.ResourceExhausted && e.reason == ""):
		code = poolExhausted
	case e.reason == "ADDRESS_IN_USE" || e.reason == "OWNER_HOLDS_OTHER_ADDRESS":
		code = addressInUse
	case e.reason == "POOL_NOT_FOUND":
		code = poolNotFound
	case e.reason == "ALLOCATION_NOT_FOUND":
		code = allocationNotFound
	case e.code == codes.Unauthenticated || e.code == codes.PermissionDenied:
		code = notAuthorized
	case e.code == codes.InvalidArgument || e.reason == "FAMILY_NOT_IN_POOL":
		code = invalidConfig
	default:
		code = serverError
	}
	msg := e.message
	if msg == "" {
		msg = details
	}
	return &cniError{code: code, msg: msg, details: details}
}

func (c *client) rpc(cfg *ipamConfig, method string, request []byte) ([]byte, *cniError) {
	response, err := c.call(method, request)
	if err != nil {
		return nil, fromRPC(err, method, cfg.endpoint)
	}
	return response, nil
}

// wireFailure is an answer that does not parse as the expected message: the server's fault.
func wireFailure(method string, err error) *cniError {
	return &cniError{code: serverError, msg: fmt.Sprintf("dsipam %s: the answer does not parse (%v)", method, err)}
}

// buildResult is the IPAM result for an allocation in the configuration's CNI version.
func buildResult(cfg *ipamConfig, alloc allocation) object {
	legacy := versionBefore(cfg.cniVersion, 1, 0, 0)
	ips := []interface{}{}
	var versions []int
	for _, a := range alloc.addresses {
		item := object{}
		if legacy {
			item = append(item, kv{"version", fmt.Sprint(a.version)})
		}
		item = append(item, kv{"address", fmt.Sprintf("%s/%d", a.ip, a.prefixLength)})
		if a.gateway != "" {
			item = append(item, kv{"gateway", a.gateway})
		}
		ips = append(ips, item)
		versions = append(versions, a.version)
	}
	hasVersion := func(v int) bool {
		for _, have := range versions {
			if have == v {
				return true
			}
		}
		return false
	}
	routes := []interface{}{}
	have := map[string]bool{}
	for _, r := range cfg.routes {
		dst, _ := r.get("dst")
		if hasVersion(cidrVersion(dst.(string))) {
			routes = append(routes, r)
			have[dst.(string)] = true
		}
	}
	if cfg.defaultRoutes {
		for _, v := range versions {
			dst := "0.0.0.0/0"
			if v == 6 {
				dst = "::/0"
			}
			if !have[dst] {
				routes = append(routes, object{{"dst", dst}})
				have[dst] = true
			}
		}
	}
	result := object{{"cniVersion", cfg.cniVersion}, {"ips", ips}}
	if len(routes) > 0 {
		result = append(result, kv{"routes", routes})
	}
	return append(result, kv{"dns", cfg.dns})
}

func cmdAdd(cfg *ipamConfig, netconf map[string]interface{}, environ map[string]string) (interface{}, *cniError) {
	containerID, ifname := environ["CNI_CONTAINERID"], environ["CNI_IFNAME"]
	cniArgs, err := parseCNIArgs(environ["CNI_ARGS"])
	if err != nil {
		return nil, err
	}
	addresses, err := requestedAddresses(cfg, netconf, cniArgs)
	if err != nil {
		return nil, err
	}
	// cni.network is recorded even when the network has no name (""): GC selects by it.
	attributes := map[string]string{attrContainer: containerID, attrIfname: ifname, attrNode: cfg.node,
		attrNetwork: cfg.network}
	for _, a := range k8sArgs {
		if v := cniArgs[a.arg]; v != "" {
			attributes[a.attribute] = v
		}
	}
	c, err := connect(cfg)
	if err != nil {
		return nil, err
	}
	defer c.close()
	response, err := c.rpc(cfg, "Allocate", allocateRequest(cfg.pool, ownerOf(containerID, ifname), cfg.policy,
		cfg.families, addresses, attributes, cfg.node))
	if err != nil {
		return nil, err
	}
	alloc, werr := decodeAllocateResponse(response)
	if werr != nil {
		return nil, wireFailure("Allocate", werr)
	}
	return buildResult(cfg, alloc), nil
}

// cmdDel releases; releasing what is not held, or from a pool that is gone, succeeds.
func cmdDel(cfg *ipamConfig, environ map[string]string) *cniError {
	c, err := connect(cfg)
	if err != nil {
		return err
	}
	defer c.close()
	response, err := c.rpc(cfg, "Release", poolOwnerRequest(cfg.pool, ownerOf(environ["CNI_CONTAINERID"], environ["CNI_IFNAME"])))
	if err != nil && err.code != poolNotFound {
		return err
	}
	if err == nil {
		if werr := decodeReleaseResponse(response); werr != nil {
			return wireFailure("Release", werr)
		}
	}
	return nil
}

// cmdCheck: the allocation exists and holds exactly the addresses of prevResult.
func cmdCheck(cfg *ipamConfig, netconf map[string]interface{}, environ map[string]string) *cniError {
	raw, present := netconf["prevResult"]
	prev, ok := raw.(map[string]interface{})
	if !ok {
		if !present || raw == nil {
			return bad("prevResult", "required for CHECK")
		}
		return bad("prevResult", "must be an object")
	}
	prevIPs := []interface{}{}
	if v, present := prev["ips"]; present {
		list, ok := v.([]interface{})
		if !ok {
			return bad("prevResult.ips", "must be a list")
		}
		prevIPs = list
	}
	expected := map[string]bool{}
	for i, ip := range prevIPs {
		where := fmt.Sprintf("prevResult.ips[%d]", i)
		item, ok := ip.(map[string]interface{})
		if !ok {
			return bad(where, "must be an object, not "+kind(ip))
		}
		address := item["address"]
		text, ok := address.(string)
		if !ok {
			if address == nil {
				return bad(where+".address", "required")
			}
			return bad(where+".address", "must be a string, not "+kind(address))
		}
		if cidrVersion(text) == 0 {
			return bad(where+".address", pyRepr(cut(text, 80))+" is not a CIDR")
		}
		parts := strings.SplitN(text, "/", 2)
		prefix := strings.TrimLeft(parts[1], "0")
		if prefix == "" {
			prefix = "0"
		}
		expected[canonicalIP(parts[0])+"/"+prefix] = true
	}
	owner := ownerOf(environ["CNI_CONTAINERID"], environ["CNI_IFNAME"])
	c, err := connect(cfg)
	if err != nil {
		return err
	}
	defer c.close()
	response, err := c.rpc(cfg, "GetAllocation", poolOwnerRequest(cfg.pool, owner))
	if err != nil {
		return err
	}
	alloc, werr := decodeAllocation(response)
	if werr != nil {
		return wireFailure("GetAllocation", werr)
	}
	held := map[string]bool{}
	for _, a := range alloc.addresses {
		held[fmt.Sprintf("%s/%d", canonicalIP(a.ip), a.prefixLength)] = true
	}
	if !sameSet(held, expected) {
		return &cniError{code: allocationMismatch, msg: fmt.Sprintf("%s holds %s in pool %s, but prevResult lists %s",
			owner, listOrNothing(held), pyRepr(cfg.pool), listOrNothing(expected))}
	}
	return nil
}

func sameSet(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func listOrNothing(set map[string]bool) string {
	if len(set) == 0 {
		return "nothing"
	}
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return strings.Join(keys, ", ")
}

// validOwners are the owners of the attachments the runtime says are still valid
// (cni.dev/valid-attachments, or libcni's cni.dev/attachments; null is an empty list, and
// neither key present is error 7: guessing "nothing is valid" would release everything in scope).
func validOwners(netconf map[string]interface{}) ([]string, *cniError) {
	var keys []string
	for _, key := range []string{validAttachments, attachmentsAlias} {
		if _, present := netconf[key]; present {
			keys = append(keys, key)
		}
	}
	if len(keys) == 0 {
		return nil, &cniError{code: invalidConfig, msg: validAttachments + ": required for GC",
			details: "the runtime passes the live attachments, [] (or null) when there are none; nothing was released"}
	}
	var owners []string
	seen := map[string]bool{}
	for _, key := range keys {
		raw := netconf[key]
		if raw == nil {
			continue
		}
		attachments, ok := raw.([]interface{})
		if !ok {
			return nil, bad(key, "must be a list, not "+kind(raw))
		}
		for i, rawItem := range attachments {
			where := fmt.Sprintf("%s[%d]", key, i)
			item, ok := rawItem.(map[string]interface{})
			if !ok {
				return nil, bad(where, "must be an object, not "+kind(rawItem))
			}
			var values [2]string
			for j, field := range []struct {
				name  string
				check func(string) string
			}{{"containerID", containerIDProblem}, {"ifname", ifnameProblem}} {
				value, present := item[field.name]
				text, isString := value.(string)
				problem := ""
				switch {
				case !present || value == nil:
					problem = "required"
				case !isString:
					problem = "must be a string, not " + kind(value)
				default:
					problem = field.check(text)
				}
				if problem != "" {
					return nil, bad(where+"."+field.name, problem)
				}
				values[j] = text
			}
			owner := ownerOf(values[0], values[1])
			if !seen[owner] {
				seen[owner] = true
				owners = append(owners, owner)
			}
		}
	}
	return owners, nil
}

// cmdGC releases the allocations of attachments that are not valid any more: gcScope node (the
// default) confines it to this node's and this network's allocations; pool hands over only the
// valid owners.
func cmdGC(cfg *ipamConfig, netconf map[string]interface{}) *cniError {
	valid, err := validOwners(netconf)
	if err != nil {
		return err
	}
	c, err := connect(cfg)
	if err != nil {
		return err
	}
	defer c.close()
	var request []byte
	if cfg.gcScope == "pool" {
		request = garbageCollectRequest(cfg.pool, valid, cfg.gcGrace, "", nil)
	} else {
		request = garbageCollectRequest(cfg.pool, valid, cfg.gcGrace, cfg.node,
			map[string]string{attrNode: cfg.node, attrNetwork: cfg.network})
	}
	response, err := c.rpc(cfg, "GarbageCollect", request)
	if err != nil {
		return err
	}
	if werr := decodeGarbageCollectResponse(response); werr != nil {
		return wireFailure("GarbageCollect", werr)
	}
	return nil
}

// cmdStatus: the service answers and the pool has free addresses for what ADD would ask; else 50.
func cmdStatus(cfg *ipamConfig) *cniError {
	c, err := connect(cfg)
	if err != nil {
		return err
	}
	defer c.close()
	response, rerr := c.call("GetPool", getPoolRequest(cfg.pool))
	if rerr != nil {
		if rerr.code == codes.PermissionDenied {
			// The service answered and knows us, but our role may not read pools (GetPool needs
			// "controller"): it is reachable, and whether the pool is full stays unknown.
			return nil
		}
		e := fromRPC(rerr, "GetPool", cfg.endpoint)
		return &cniError{code: notAvailable, msg: e.msg, details: fmt.Sprintf("%s (would be CNI error %d)", e.details, e.code)}
	}
	usage, werr := decodePoolUsage(response)
	if werr != nil {
		return wireFailure("GetPool", werr)
	}
	free := map[int]uint64{}
	var wanted []int
	for _, u := range usage {
		free[u.version] = u.free
	}
	for _, f := range cfg.families {
		wanted = append(wanted, map[int]int{ipv4: 4, ipv6: 6}[f])
	}
	if len(wanted) == 0 {
		for _, u := range usage {
			wanted = append(wanted, u.version)
		}
	}
	var needed []int
	switch cfg.policy {
	case 3: // RequireDualStack
		needed = []int{4, 6}
	case 2: // PreferDualStack: any one family will do
		anyFree := false
		for _, v := range wanted {
			anyFree = anyFree || free[v] > 0
		}
		if !anyFree && len(wanted) > 0 {
			needed = wanted[:1]
		}
	default:
		if len(wanted) > 0 {
			needed = wanted[:1]
		}
	}
	var empty []string
	for _, v := range needed {
		if free[v] == 0 {
			empty = append(empty, fmt.Sprintf("IPv%d", v))
		}
	}
	if len(empty) > 0 || len(usage) == 0 {
		names := strings.Join(empty, "/")
		if names == "" {
			names = "any"
		}
		var parts []string
		for _, u := range usage {
			parts = append(parts, fmt.Sprintf("IPv%d: %d of %d free", u.version, u.free, u.size))
		}
		return &cniError{code: notAvailable, msg: fmt.Sprintf("pool %s has no free %s address", pyRepr(cfg.pool), names),
			details: strings.Join(parts, ", ")}
	}
	return nil
}
