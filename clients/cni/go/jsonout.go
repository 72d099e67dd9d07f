package main

// JSON in and out. Decoding keeps numbers as their text (json.Number) so that an integer and a
// float stay apart, as in the Python plugin; encoding keeps the order of an object's keys and
// writes ASCII only, like the Python plugin's output.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// kv is one key of an ordered JSON object.
type kv struct {
	Key   string
	Value interface{}
}

// object is a JSON object whose keys keep their order.
type object []kv

func (o object) get(key string) (interface{}, bool) {
	for _, item := range o {
		if item.Key == key {
			return item.Value, true
		}
	}
	return nil, false
}

func decodeJSON(data []byte) (interface{}, error) {
	if !utf8.Valid(data) {
		return nil, fmt.Errorf("not valid UTF-8")
	}
	if loneSurrogate(data) {
		return nil, fmt.Errorf("a string with a lone surrogate")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var value interface{}
	if err := dec.Decode(&value); err != nil {
		return nil, err
	}
	if err := checkDecoded(value, 1); err != nil {
		return nil, err
	}
	var extra interface{}
	if err := dec.Decode(&extra); err == nil {
		return nil, fmt.Errorf("extra data after the JSON document")
	} else if err.Error() != "EOF" {
		return nil, fmt.Errorf("extra data after the JSON document: %v", err)
	}
	return value, nil
}

func encodeJSON(buf *bytes.Buffer, value interface{}) {
	switch v := value.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		if v {
			buf.WriteString("true")
		} else {
			buf.WriteString("false")
		}
	case string:
		quote(buf, v)
	case int:
		buf.WriteString(strconv.Itoa(v))
	case uint64:
		buf.WriteString(strconv.FormatUint(v, 10))
	case json.Number:
		buf.WriteString(pyNumber(v)) // as the Python plugin prints what it decoded
	case object:
		buf.WriteByte('{')
		for i, item := range v {
			if i > 0 {
				buf.WriteString(", ")
			}
			quote(buf, item.Key)
			buf.WriteString(": ")
			encodeJSON(buf, item.Value)
		}
		buf.WriteByte('}')
	case map[string]interface{}:
		// A decoded object passed through (an extra route attribute): sorted keys.
		keys := sortedKeys(v)
		o := make(object, 0, len(keys))
		for _, k := range keys {
			o = append(o, kv{k, v[k]})
		}
		encodeJSON(buf, o)
	case []interface{}:
		buf.WriteByte('[')
		for i, item := range v {
			if i > 0 {
				buf.WriteString(", ")
			}
			encodeJSON(buf, item)
		}
		buf.WriteByte(']')
	case []string:
		items := make([]interface{}, len(v))
		for i, s := range v {
			items[i] = s
		}
		encodeJSON(buf, items)
	default:
		panic(fmt.Sprintf("cannot serialize %T", value))
	}
}

const hexDigits = "0123456789abcdef"

func quote(buf *bytes.Buffer, s string) {
	buf.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			buf.WriteString(`\"`)
		case r == '\\':
			buf.WriteString(`\\`)
		case r == '\n':
			buf.WriteString(`\n`)
		case r == '\r':
			buf.WriteString(`\r`)
		case r == '\t':
			buf.WriteString(`\t`)
		case r == '\b':
			buf.WriteString(`\b`)
		case r == '\f':
			buf.WriteString(`\f`)
		case r < 0x20 || (r >= 0x7f && r < 0x10000):
			writeU(buf, r)
		case r >= 0x10000:
			r -= 0x10000
			writeU(buf, 0xd800+(r>>10))
			writeU(buf, 0xdc00+(r&0x3ff))
		default:
			buf.WriteRune(r)
		}
	}
	buf.WriteByte('"')
}

func writeU(buf *bytes.Buffer, r rune) {
	buf.WriteString(`\u`)
	for shift := 12; shift >= 0; shift -= 4 {
		buf.WriteByte(hexDigits[(r>>uint(shift))&0xf])
	}
}

func dumps(value interface{}) string {
	var buf bytes.Buffer
	encodeJSON(&buf, value)
	return buf.String()
}
