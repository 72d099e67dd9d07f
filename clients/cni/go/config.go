package main

// The network configuration: the ipam section and the CNI fields the plugin reads. It mirrors
// clients/cni/dsipam/cni/_config.py rule for rule and message for message; tests/e2e runs the
// same tests against both plugins.

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

const latestVersion = "1.1.0"
const defaultTimeout = 10.0

var policies = map[string]int{"singlestack": 1, "preferdualstack": 2, "requiredualstack": 3}
var familyNames = map[string]int{"ipv4": 1, "ipv6": 2, "4": 1, "6": 2}
var routeExtras11 = []string{"mtu", "advmss", "priority", "table", "scope"}

type tlsConfig struct {
	CA, Cert, Key, ServerName string
}

type ipamConfig struct {
	cniVersion    string
	network       string
	endpoint      string
	target        string // "unix:///path" or host:port
	pool          string
	policy        int
	families      []int
	addresses     []string
	routes        []object
	defaultRoutes bool
	dns           object
	timeout       float64
	tls           *tlsConfig
	token         string
	transport     string
	gcScope       string
	gcGrace       *float64
	node          string
}

func versionTuple(version string) []int {
	var out []int
	for _, part := range strings.Split(version, ".") {
		n, _ := strconv.Atoi(part)
		out = append(out, n)
	}
	return out
}

// versionBefore says whether version is earlier than want.
func versionBefore(version string, want ...int) bool {
	have := versionTuple(version)
	for i := range want {
		if i >= len(have) {
			return true
		}
		if have[i] != want[i] {
			return have[i] < want[i]
		}
	}
	return false
}

func bad(field, problem string) *cniError {
	return &cniError{code: invalidConfig, msg: field + ": " + problem}
}

// parseAddr is inet_pton: a bare IPv4 or IPv6 address, no zone.
func parseAddr(text string) (netip.Addr, int) {
	if text == "" {
		return netip.Addr{}, 0
	}
	addr, err := netip.ParseAddr(text)
	if err != nil || addr.Zone() != "" {
		return netip.Addr{}, 0
	}
	if strings.Contains(text, ":") {
		// inet_pton takes at most 4 hex digits a group; Go 1.19's parser takes leading zeros beyond.
		for _, group := range strings.Split(text, ":") {
			if len(group) > 4 && !strings.Contains(group, ".") {
				return netip.Addr{}, 0
			}
		}
		return addr, 6
	}
	return addr, 4
}

func ipVersion(text string) int {
	_, version := parseAddr(text)
	return version
}

// canonicalIP is inet_ntop(inet_pton(text)); text itself when it is not an address.
func canonicalIP(text string) string {
	addr, version := parseAddr(text)
	if version == 0 {
		return text
	}
	return addr.String()
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// cidrVersion is 4 or 6 for address/prefix with a prefix that fits the family; 0 otherwise.
func cidrVersion(text string) int {
	if strings.Count(text, "/") != 1 {
		return 0
	}
	parts := strings.SplitN(text, "/", 2)
	version := ipVersion(parts[0])
	if version == 0 || !isDigits(parts[1]) {
		return 0
	}
	digits := strings.TrimLeft(parts[1], "0")
	limit := 32
	if version == 6 {
		limit = 128
	}
	if prefix, err := strconv.Atoi("0" + digits); len(digits) > 3 || err != nil || prefix > limit {
		return 0
	}
	return version
}

// kind names a decoded JSON value's type, for messages.
func kind(value interface{}) string {
	switch value.(type) {
	case map[string]interface{}:
		return "an object"
	case []interface{}:
		return "a list"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	}
	return "null"
}

// pyRepr quotes a string as Python's repr() does, so that messages read the same from both plugins.
func pyRepr(s string) string {
	q := byte('\'')
	if strings.Contains(s, "'") && !strings.Contains(s, "\"") {
		q = '"'
	}
	var b strings.Builder
	b.WriteByte(q)
	for i := 0; i < len(s); {
		r, width := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && width == 1 {
			// A byte that is not UTF-8 (from the environment): Python's surrogateescape, \udcXX.
			fmt.Fprintf(&b, `\udc%02x`, s[i])
			i++
			continue
		}
		i += width
		switch {
		case r == rune(q) || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r > 0x7f && !unicode.IsPrint(r):
			if r < 0x100 {
				fmt.Fprintf(&b, `\x%02x`, r)
			} else if r < 0x10000 {
				fmt.Fprintf(&b, `\u%04x`, r)
			} else {
				fmt.Fprintf(&b, `\U%08x`, r)
			}
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte(q)
	return b.String()
}

// cut returns the first n characters of s (Python's s[:n]).
func cut(s string, n int) string {
	i := 0
	for pos := range s {
		if i == n {
			return s[:pos]
		}
		i++
	}
	return s
}

func sortedKeys(m map[string]interface{}) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func getString(section map[string]interface{}, key, where string, required bool) (string, *cniError) {
	value, ok := section[key]
	if !ok || value == nil {
		if required {
			return "", bad(where, "required")
		}
		return "", nil
	}
	s, isString := value.(string)
	if !isString {
		return "", bad(where, "must be a string, not "+kind(value))
	}
	if required && s == "" {
		return "", bad(where, "required")
	}
	return s, nil
}

// getChoice reads ipam.<key>, one of two words: the first when absent or "".
func getChoice(ipam map[string]interface{}, key, first, second string) (string, *cniError) {
	value, err := getString(ipam, key, "ipam."+key, false)
	if err != nil {
		return "", err
	}
	if value == "" {
		return first, nil
	}
	if value != first && value != second {
		return "", bad("ipam."+key, pyRepr(value)+" is not "+first+" or "+second)
	}
	return value, nil
}

func getStringList(section map[string]interface{}, key, where string) ([]string, *cniError) {
	value, ok := section[key]
	if !ok || value == nil {
		return nil, nil
	}
	items, isList := value.([]interface{})
	if !isList {
		return nil, bad(where, "must be a list, not "+kind(value))
	}
	out := make([]string, 0, len(items))
	for i, item := range items {
		s, isString := item.(string)
		if !isString {
			return nil, bad(fmt.Sprintf("%s[%d]", where, i), "must be a string, not "+kind(item))
		}
		out = append(out, s)
	}
	return out, nil
}

// getSeconds reads a number of seconds in [0, 86400] (0 only when allowZero); nil when absent.
func getSeconds(section map[string]interface{}, key, where string, allowZero bool) (*float64, *cniError) {
	value, ok := section[key]
	if !ok || value == nil {
		return nil, nil
	}
	number, isNumber := value.(json.Number)
	if !isNumber {
		return nil, bad(where, "must be a number of seconds, not "+kind(value))
	}
	f, err := strconv.ParseFloat(number.String(), 64)
	if err != nil && math.IsInf(f, 0) && isIntegerLiteral(number.String()) {
		// An int of more than 308 digits: Python compares it exactly, and it is out of range.
		return nil, bad(where, pyNumber(number)+" is out of range")
	}
	if err != nil || math.IsNaN(f) {
		return nil, bad(where, "must be a number of seconds, not "+kind(value))
	}
	if f < 0 || (f == 0 && !allowZero) || f > 86400 {
		return nil, bad(where, pyNumber(number)+" is out of range")
	}
	return &f, nil
}

// endpointTarget is the dial target for unix:///path, unix:path, /path or host:port.
func endpointTarget(value string) (string, error) {
	var path string
	switch {
	case strings.HasPrefix(value, "unix://"):
		path = value[len("unix://"):]
	case strings.HasPrefix(value, "unix:"):
		path = value[len("unix:"):]
	case strings.HasPrefix(value, "/"):
		path = value
	default:
		i := strings.LastIndex(value, ":")
		if i < 0 {
			return "", fmt.Errorf("expected a unix socket path, unix:///path or host:port")
		}
		host, port := value[:i], value[i+1:]
		n, err := strconv.Atoi(port)
		if host == "" || host == "[]" || !isDigits(port) || len(strings.TrimLeft(port, "0")) > 5 || err != nil ||
			n <= 0 || n >= 65536 {
			return "", fmt.Errorf("expected a unix socket path, unix:///path or host:port")
		}
		if strings.Contains(host, ":") && !(strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]")) {
			return "", fmt.Errorf("an IPv6 host needs brackets: [fd00::1]:50051")
		}
		return value, nil
	}
	if !strings.HasPrefix(path, "/") {
		return "", fmt.Errorf("a unix socket path must be absolute")
	}
	return "unix://" + path, nil
}

func checkVersion(netconf map[string]interface{}) (string, *cniError) {
	value, ok := netconf["cniVersion"]
	if !ok || value == nil || value == "" {
		return "", bad("cniVersion", "required")
	}
	version, isString := value.(string)
	if !isString {
		return "", bad("cniVersion", "must be a string, not "+kind(value))
	}
	for _, v := range supportedVersions {
		if v == version {
			return version, nil
		}
	}
	return "", &cniError{code: incompatibleVersion, msg: "cniVersion: " + pyRepr(version) + " is not supported",
		details: "supported versions: " + strings.Join(supportedVersions, ", ")}
}

// parseConfig reads and validates the plugin's configuration; environ supplies K8S_NODE_NAME
// when the configuration names no node.
func parseConfig(decoded interface{}, environ map[string]string) (*ipamConfig, *cniError) {
	netconf, ok := decoded.(map[string]interface{})
	if !ok {
		return nil, bad("network configuration", "must be a JSON object, not "+kind(decoded))
	}
	cfg := &ipamConfig{cniVersion: latestVersion, policy: 1, timeout: defaultTimeout, transport: "native",
		gcScope: "node"}
	var err *cniError
	if cfg.cniVersion, err = checkVersion(netconf); err != nil {
		return nil, err
	}
	if cfg.network, err = getString(netconf, "name", "name", false); err != nil {
		return nil, err
	}
	ipam, isObject := netconf["ipam"].(map[string]interface{})
	if !isObject {
		if netconf["ipam"] == nil {
			return nil, bad("ipam", "required")
		}
		return nil, bad("ipam", "must be an object, not "+kind(netconf["ipam"]))
	}
	if cfg.endpoint, err = getString(ipam, "endpoint", "ipam.endpoint", true); err != nil {
		return nil, err
	}
	target, terr := endpointTarget(cfg.endpoint)
	if terr != nil {
		return nil, bad("ipam.endpoint", pyRepr(cfg.endpoint)+": "+terr.Error())
	}
	cfg.target = target
	if cfg.pool, err = getString(ipam, "pool", "ipam.pool", true); err != nil {
		return nil, err
	}

	policy, err := getString(ipam, "ipFamilyPolicy", "ipam.ipFamilyPolicy", false)
	if err != nil {
		return nil, err
	}
	if policy != "" {
		key := strings.NewReplacer("_", "", "-", "").Replace(pyLower(policy))
		p, known := policies[key]
		if !known {
			return nil, bad("ipam.ipFamilyPolicy", pyRepr(policy)+" is not SingleStack, PreferDualStack or RequireDualStack")
		}
		cfg.policy = p
	}
	families, err := getStringList(ipam, "ipFamilies", "ipam.ipFamilies")
	if err != nil {
		return nil, err
	}
	for i, name := range families {
		family, known := familyNames[pyLower(name)]
		where := fmt.Sprintf("ipam.ipFamilies[%d]", i)
		if !known {
			return nil, bad(where, pyRepr(name)+" is not IPv4 or IPv6")
		}
		for _, have := range cfg.families {
			if have == family {
				return nil, bad(where, pyRepr(name)+" is listed twice")
			}
		}
		cfg.families = append(cfg.families, family)
	}
	if len(cfg.families) > 1 && cfg.policy == 1 {
		return nil, bad("ipam.ipFamilies", "two families need ipFamilyPolicy PreferDualStack or RequireDualStack")
	}

	addresses, err := getStringList(ipam, "addresses", "ipam.addresses")
	if err != nil {
		return nil, err
	}
	for i, text := range addresses {
		address := requestedAddress(text)
		if address == "" {
			return nil, bad(fmt.Sprintf("ipam.addresses[%d]", i), pyRepr(text)+" is not an IP address")
		}
		cfg.addresses = append(cfg.addresses, address)
	}

	if cfg.routes, err = parseRoutes(ipam["routes"], cfg.cniVersion); err != nil {
		return nil, err
	}
	if value, present := ipam["defaultRoutes"]; present {
		b, isBool := value.(bool)
		if !isBool {
			return nil, bad("ipam.defaultRoutes", "must be true or false, not "+kind(value))
		}
		cfg.defaultRoutes = b
	}
	if cfg.dns, err = parseDNS(ipam["dns"]); err != nil {
		return nil, err
	}

	timeout, err := getSeconds(ipam, "timeout", "ipam.timeout", false)
	if err != nil {
		return nil, err
	}
	if timeout != nil {
		cfg.timeout = *timeout
	}
	if cfg.transport, err = getChoice(ipam, "transport", "native", "grpc"); err != nil {
		return nil, err
	}
	if raw, present := ipam["tls"]; present && raw != nil {
		section, isObject := raw.(map[string]interface{})
		if !isObject {
			return nil, bad("ipam.tls", "must be an object, not "+kind(raw))
		}
		t := &tlsConfig{}
		for _, field := range []struct {
			key string
			dst *string
		}{{"ca", &t.CA}, {"cert", &t.Cert}, {"key", &t.Key}, {"serverName", &t.ServerName}} {
			if *field.dst, err = getString(section, field.key, "ipam.tls."+field.key, false); err != nil {
				return nil, err
			}
		}
		cfg.tls = t
		if (t.Cert != "") != (t.Key != "") {
			return nil, bad("ipam.tls", "cert and key go together")
		}
		if strings.HasPrefix(cfg.target, "unix:") {
			return nil, bad("ipam.tls", "TLS needs a host:port endpoint")
		}
		if _, given := ipam["transport"]; given && cfg.transport == "native" {
			return nil, bad("ipam.transport", "native speaks cleartext only; TLS needs transport grpc")
		}
		cfg.transport = "grpc"
	}
	if cfg.token, err = readToken(ipam, cfg); err != nil {
		return nil, err
	}

	if cfg.gcScope, err = getChoice(ipam, "gcScope", "node", "pool"); err != nil {
		return nil, err
	}
	if cfg.gcGrace, err = getSeconds(ipam, "gcGrace", "ipam.gcGrace", true); err != nil {
		return nil, err
	}
	if cfg.node, err = getString(ipam, "node", "ipam.node", false); err != nil {
		return nil, err
	}
	if cfg.node == "" {
		cfg.node = environ["K8S_NODE_NAME"]
	}
	if cfg.node == "" {
		cfg.node, _ = os.Hostname()
	}
	return cfg, nil
}

// pyLower is str.lower(): Unicode lower case, where U+0130 (dotted capital I) becomes "i̇" (two
// characters), not Go's "i".
func pyLower(s string) string {
	return strings.ToLower(strings.ReplaceAll(s, "\u0130", "i\u0307"))
}

// pyStrip is str.strip(): Unicode white space at both ends.
func pyStrip(s string) string {
	return strings.TrimFunc(s, func(r rune) bool { return unicode.IsSpace(r) || (r >= 0x1c && r <= 0x1f) })
}

// readToken is the bearer token of token or tokenFile; sent only where nobody can read it on the way.
func readToken(ipam map[string]interface{}, cfg *ipamConfig) (string, *cniError) {
	token, err := getString(ipam, "token", "ipam.token", false)
	if err != nil {
		return "", err
	}
	where := "ipam.token"
	path, err := getString(ipam, "tokenFile", "ipam.tokenFile", false)
	if err != nil {
		return "", err
	}
	if path != "" {
		if token != "" {
			return "", bad("ipam.tokenFile", "give token or tokenFile, not both")
		}
		where = "ipam.tokenFile"
		data, rerr := readLimited(path)
		if rerr != nil {
			return "", bad(where, "cannot read "+pyRepr(path)+": "+strerror(rerr))
		}
		token = pyStrip(strings.ToValidUTF8(string(data), "\ufffd"))
	}
	if token == "" {
		return "", nil
	}
	for i := 0; i < len(token); i++ {
		if token[i] < 0x21 || token[i] > 0x7e {
			return "", bad(where, "a token is printable ASCII without spaces")
		}
	}
	if cfg.tls == nil && !strings.HasPrefix(cfg.target, "unix:") {
		return "", bad(where, "a bearer token is sent only over a unix socket or TLS, not cleartext TCP")
	}
	return token, nil
}

// requestedAddress is an address asked for (198.18.0.9 or 198.18.0.9/24: the prefix is the
// pool's anyway), without prefix; "" when text is not one.
func requestedAddress(text string) string {
	address := text
	if strings.Contains(text, "/") {
		if cidrVersion(text) == 0 {
			return ""
		}
		address = strings.SplitN(text, "/", 2)[0]
	}
	if ipVersion(address) == 0 {
		return ""
	}
	return canonicalIP(address)
}

func parseRoutes(value interface{}, cniVersion string) ([]object, *cniError) {
	if value == nil {
		return nil, nil
	}
	routes, isList := value.([]interface{})
	if !isList {
		return nil, bad("ipam.routes", "must be a list, not "+kind(value))
	}
	extras := !versionBefore(cniVersion, 1, 1, 0)
	var out []object
	for i, raw := range routes {
		where := fmt.Sprintf("ipam.routes[%d]", i)
		route, isObject := raw.(map[string]interface{})
		if !isObject {
			return nil, bad(where, "must be an object, not "+kind(raw))
		}
		dst, err := getString(route, "dst", where+".dst", true)
		if err != nil {
			return nil, err
		}
		version := cidrVersion(dst)
		if version == 0 {
			return nil, bad(where+".dst", pyRepr(dst)+" is not a CIDR")
		}
		item := object{{"dst", dst}}
		gw, err := getString(route, "gw", where+".gw", false)
		if err != nil {
			return nil, err
		}
		if gw != "" {
			if ipVersion(gw) != version {
				return nil, bad(where+".gw", fmt.Sprintf("%s is not an IPv%d address", pyRepr(gw), version))
			}
			item = append(item, kv{"gw", gw})
		}
		if extras {
			for _, key := range routeExtras11 {
				if v, present := route[key]; present {
					item = append(item, kv{key, v})
				}
			}
		}
		out = append(out, item)
	}
	return out, nil
}

func parseDNS(value interface{}) (object, *cniError) {
	if value == nil {
		return object{}, nil
	}
	section, isObject := value.(map[string]interface{})
	if !isObject {
		return nil, bad("ipam.dns", "must be an object, not "+kind(value))
	}
	out := object{}
	nameservers, err := getStringList(section, "nameservers", "ipam.dns.nameservers")
	if err != nil {
		return nil, err
	}
	for i, server := range nameservers {
		if ipVersion(server) == 0 {
			return nil, bad(fmt.Sprintf("ipam.dns.nameservers[%d]", i), pyRepr(server)+" is not an IP address")
		}
	}
	if len(nameservers) > 0 {
		out = append(out, kv{"nameservers", nameservers})
	}
	domain, err := getString(section, "domain", "ipam.dns.domain", false)
	if err != nil {
		return nil, err
	}
	if domain != "" {
		out = append(out, kv{"domain", domain})
	}
	for _, key := range []string{"search", "options"} {
		items, err := getStringList(section, key, "ipam.dns."+key)
		if err != nil {
			return nil, err
		}
		if len(items) > 0 {
			out = append(out, kv{key, items})
		}
	}
	return out, nil
}
