package main

// Protocol-buffer wire codec for the few dsipam.v1 messages the plugin sends and reads, as in
// clients/cni/dsipam/cni/_wire.py (field numbers from proto/dsipam/v1/ipam.proto;
// tests/e2e/test_cni_wire.py checks the Python copy against the generated descriptors, and the
// end-to-end tests run both plugins against a real server).

import (
	"errors"
	"math"
	"sort"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

const (
	ipv4 = 1 // dsipam.v1.IpFamily
	ipv6 = 2
)

var familyVersion = map[uint64]int{ipv4: 4, ipv6: 6}

func appendString(b []byte, number protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, number, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendBytes(b []byte, number protowire.Number, data []byte) []byte {
	b = protowire.AppendTag(b, number, protowire.BytesType)
	return protowire.AppendBytes(b, data)
}

func appendUint(b []byte, number protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, number, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// appendMap writes a map<string, string> field, keys sorted (the order does not matter on the wire).
func appendMap(b []byte, number protowire.Number, m map[string]string) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		entry := appendString(nil, 1, k)
		entry = appendString(entry, 2, m[k])
		b = appendBytes(b, number, entry)
	}
	return b
}

func allocateRequest(pool, owner string, policy int, families []int, addresses []string,
	attributes map[string]string, node string) []byte {
	b := appendString(nil, 1, pool)
	b = appendString(b, 2, owner)
	b = appendUint(b, 3, uint64(policy))
	if len(families) > 0 {
		var packed []byte
		for _, f := range families {
			packed = protowire.AppendVarint(packed, uint64(f))
		}
		b = appendBytes(b, 4, packed)
	}
	for _, a := range addresses {
		b = appendBytes(b, 5, []byte(a))
	}
	b = appendMap(b, 6, attributes)
	return appendString(b, 7, node)
}

func poolOwnerRequest(pool, owner string) []byte {
	return appendString(appendString(nil, 1, pool), 2, owner)
}

func getPoolRequest(name string) []byte {
	return appendString(nil, 1, name)
}

func garbageCollectRequest(pool string, validOwners []string, grace *float64, node string,
	selector map[string]string) []byte {
	b := appendString(nil, 1, pool)
	for _, o := range validOwners {
		b = appendBytes(b, 2, []byte(o))
	}
	if grace != nil {
		seconds := math.Trunc(*grace)
		nanos := math.RoundToEven((*grace - seconds) * 1e9) // Python's round()
		if nanos == 1e9 {                                   // 0.9999999996 rounds up: a Duration's nanos stay below 1e9
			seconds, nanos = seconds+1, 0
		}
		duration := appendUint(nil, 1, uint64(seconds))
		duration = appendUint(duration, 2, uint64(nanos))
		b = appendBytes(b, 3, duration) // google.protobuf.Duration
	}
	b = appendString(b, 4, node)
	return appendMap(b, 5, selector)
}

// fields is a decoded message: field number -> values (uint64 for varints, []byte otherwise).
type fields map[protowire.Number][]interface{}

var errWire = errors.New("bytes that do not parse as the expected message")

func parseMessage(data []byte) (fields, error) {
	out := fields{}
	for len(data) > 0 {
		number, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return nil, errWire
		}
		data = data[n:]
		var value interface{}
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(data)
			if m < 0 {
				return nil, errWire
			}
			value, n = v, m
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(data)
			if m < 0 {
				return nil, errWire
			}
			value, n = v, m
		case protowire.StartGroupType, protowire.EndGroupType:
			return nil, errWire // groups: no dsipam.v1 message has one (nor does _wire.py take them)
		default:
			m := protowire.ConsumeFieldValue(number, typ, data)
			if m < 0 {
				return nil, errWire
			}
			value, n = data[:m], m
		}
		data = data[n:]
		out[number] = append(out[number], value)
	}
	return out, nil
}

// typed says whether the fields that are strings or messages came as bytes and the numbers as
// varints: a field of the wrong wire type is an answer that does not parse (as in _wire.py).
func (f fields) typed(bytesFields, varintFields []protowire.Number) bool {
	for _, number := range bytesFields {
		for _, v := range f[number] {
			if _, ok := v.([]byte); !ok {
				return false
			}
		}
	}
	for _, number := range varintFields {
		for _, v := range f[number] {
			if _, ok := v.(uint64); !ok {
				return false
			}
		}
	}
	return true
}

var errWireType = errors.New("a field of the wrong wire type")

func (f fields) text(number protowire.Number) string {
	values := f[number]
	if len(values) == 0 {
		return ""
	}
	if b, ok := values[len(values)-1].([]byte); ok {
		return string(b)
	}
	return ""
}

func (f fields) uint(number protowire.Number) uint64 {
	values := f[number]
	if len(values) == 0 {
		return 0
	}
	if v, ok := values[len(values)-1].(uint64); ok {
		return v
	}
	return 0
}

func (f fields) messages(number protowire.Number) [][]byte {
	var out [][]byte
	for _, v := range f[number] {
		if b, ok := v.([]byte); ok {
			out = append(out, b)
		}
	}
	return out
}

type address struct {
	version      int
	ip           string
	prefixLength uint64
	gateway      string
}

type allocation struct {
	pool, owner string
	addresses   []address
}

type familyUsage struct {
	version int
	size    uint64
	free    uint64
}

func decodeAddress(data []byte) (address, error) {
	f, err := parseMessage(data)
	if err != nil {
		return address{}, err
	}
	if !f.typed([]protowire.Number{2, 4}, []protowire.Number{1, 3}) {
		return address{}, errWireType
	}
	a := address{familyVersion[f.uint(1)], f.text(2), f.uint(3), f.text(4)}
	if !utf8.ValidString(a.ip) || !utf8.ValidString(a.gateway) {
		return address{}, errNotText
	}
	return a, nil
}

var errNotText = errors.New("a string field that is not UTF-8")

// checkAllocation parses what the plugin does not use of an Allocation (its map of
// attributes, its node): an answer is refused whole when any of it does not parse.
func checkAllocation(f fields) error {
	if !f.typed([]protowire.Number{1, 2, 3, 4, 5, 6}, nil) {
		return errWireType
	}
	for _, number := range []protowire.Number{1, 2, 6} {
		if !utf8.ValidString(f.text(number)) {
			return errNotText
		}
	}
	for _, entry := range f.messages(4) {
		e, err := parseMessage(entry)
		if err != nil {
			return err
		}
		if !e.typed([]protowire.Number{1, 2}, nil) {
			return errWireType
		}
		if !utf8.ValidString(e.text(1)) || !utf8.ValidString(e.text(2)) {
			return errNotText
		}
	}
	if ts := f.messages(5); len(ts) > 0 {
		t, err := parseMessage(ts[len(ts)-1])
		if err != nil {
			return err
		}
		if !t.typed(nil, []protowire.Number{1, 2}) {
			return errWireType
		}
	}
	return nil
}

// checkReleased checks a response whose field 1 lists what was released (ReleaseResponse:
// addresses; GarbageCollectResponse: allocations), each with decode.
func checkReleased(data []byte, decode func([]byte) error) error {
	f, err := parseMessage(data)
	if err != nil {
		return err
	}
	if !f.typed([]protowire.Number{1}, nil) {
		return errWireType
	}
	for _, raw := range f.messages(1) {
		if err := decode(raw); err != nil {
			return err
		}
	}
	return nil
}

// decodeReleaseResponse checks a dsipam.v1.ReleaseResponse (the released addresses).
func decodeReleaseResponse(data []byte) error {
	return checkReleased(data, func(raw []byte) error { _, err := decodeAddress(raw); return err })
}

// decodeGarbageCollectResponse checks a dsipam.v1.GarbageCollectResponse (the released allocations).
func decodeGarbageCollectResponse(data []byte) error {
	return checkReleased(data, func(raw []byte) error { _, err := decodeAllocation(raw); return err })
}

func decodeAllocation(data []byte) (allocation, error) {
	f, err := parseMessage(data)
	if err != nil {
		return allocation{}, err
	}
	if err := checkAllocation(f); err != nil {
		return allocation{}, err
	}
	out := allocation{pool: f.text(1), owner: f.text(2)}
	for _, raw := range f.messages(3) {
		a, err := decodeAddress(raw)
		if err != nil {
			return allocation{}, err
		}
		out.addresses = append(out.addresses, a)
	}
	return out, nil
}

func decodeAllocateResponse(data []byte) (allocation, error) {
	f, err := parseMessage(data)
	if err != nil {
		return allocation{}, err
	}
	if !f.typed([]protowire.Number{1}, []protowire.Number{2}) {
		return allocation{}, errWireType
	}
	var inner []byte
	if m := f.messages(1); len(m) > 0 {
		inner = m[len(m)-1]
	}
	return decodeAllocation(inner)
}

func decodePoolUsage(data []byte) ([]familyUsage, error) {
	f, err := parseMessage(data)
	if err != nil {
		return nil, err
	}
	if !f.typed([]protowire.Number{4}, nil) {
		return nil, errWireType
	}
	var out []familyUsage
	for _, raw := range f.messages(4) {
		u, err := parseMessage(raw)
		if err != nil {
			return nil, err
		}
		if !u.typed(nil, []protowire.Number{1, 2, 3, 4}) {
			return nil, errWireType
		}
		out = append(out, familyUsage{familyVersion[u.uint(1)], u.uint(2), u.uint(4)})
	}
	return out, nil
}

const errorInfoType = "type.googleapis.com/google.rpc.ErrorInfo"

// errorInfoReason is the reason of a google.rpc.ErrorInfo, or "".
func errorInfoReason(typeURL string, value []byte) string {
	if typeURL != errorInfoType {
		return ""
	}
	f, err := parseMessage(value)
	if err != nil {
		return ""
	}
	return f.text(1)
}
