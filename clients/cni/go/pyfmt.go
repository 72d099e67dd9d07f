package main

// Python's spelling of values in messages and of numbers in output, so that both plugins print
// the same text: a JSON number is a Python int (its digits) or float (repr: the shortest
// round-trip digits, exponent form below 1e-4 and from 1e16), as the Python plugin decodes it.

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// maxIntDigits is Python's limit on the digits of an int read from text (sys.int_info).
const maxIntDigits = 4300

func isIntegerLiteral(text string) bool {
	return !strings.ContainsAny(text, ".eE")
}

// pyNumber is repr() of the int or float Python's JSON decoder makes of a JSON number.
func pyNumber(n json.Number) string {
	text := n.String()
	if isIntegerLiteral(text) {
		if text == "-0" {
			return "0"
		}
		return text
	}
	f, _ := strconv.ParseFloat(text, 64)
	return pyFloat(f)
}

// pyFloat is Python's repr() of a finite float.
func pyFloat(f float64) string {
	if f == 0 {
		if math.Signbit(f) {
			return "-0.0"
		}
		return "0.0"
	}
	s := strconv.FormatFloat(f, 'e', -1, 64) // "-1.2345e+06"
	neg := s[0] == '-'
	if neg {
		s = s[1:]
	}
	e := strings.IndexByte(s, 'e')
	digits := strings.Replace(s[:e], ".", "", 1)
	exp, _ := strconv.Atoi(s[e+1:])
	var out string
	switch {
	case exp < -4 || exp >= 16:
		m := digits[:1]
		if len(digits) > 1 {
			m += "." + digits[1:]
		}
		sign := "+"
		if exp < 0 {
			sign, exp = "-", -exp
		}
		out = fmt.Sprintf("%se%s%02d", m, sign, exp)
	case exp >= 0:
		if len(digits) <= exp+1 {
			out = digits + strings.Repeat("0", exp+1-len(digits)) + ".0"
		} else {
			out = digits[:exp+1] + "." + digits[exp+1:]
		}
	default:
		out = "0." + strings.Repeat("0", -exp-1) + digits
	}
	if neg {
		out = "-" + out
	}
	return out
}

// maxDepth bounds the nesting of the network configuration (the Python plugin's too).
const maxDepth = 512

// checkDecoded refuses what Python's decoder refuses or turns into infinity (an int of more than
// 4300 digits, a float out of range) and nesting deeper than maxDepth.
func checkDecoded(value interface{}, depth int) error {
	switch v := value.(type) {
	case json.Number:
		text := v.String()
		if isIntegerLiteral(text) {
			if len(strings.TrimPrefix(text, "-")) > maxIntDigits {
				return fmt.Errorf("an integer of more than %d digits", maxIntDigits)
			}
			return nil
		}
		if f, err := strconv.ParseFloat(text, 64); err != nil && math.IsInf(f, 0) {
			return fmt.Errorf("number %s is out of range", cut(text, 20))
		}
	case []interface{}:
		if depth > maxDepth {
			return fmt.Errorf("nested deeper than %d", maxDepth)
		}
		for _, item := range v {
			if err := checkDecoded(item, depth+1); err != nil {
				return err
			}
		}
	case map[string]interface{}:
		if depth > maxDepth {
			return fmt.Errorf("nested deeper than %d", maxDepth)
		}
		for _, item := range v {
			if err := checkDecoded(item, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// loneSurrogate says whether a JSON text escapes a lone UTF-16 surrogate ("\ud800"), which Go's
// decoder would quietly turn into U+FFFD and Python's keeps (both plugins refuse it: not text).
func loneSurrogate(data []byte) bool {
	inString := false
	for i := 0; i < len(data); i++ {
		c := data[i]
		if !inString {
			inString = c == '"'
			continue
		}
		switch c {
		case '"':
			inString = false
		case '\\':
			if i+5 >= len(data) || data[i+1] != 'u' {
				i++ // an escaped character
				continue
			}
			r := hex4(data[i+2 : i+6])
			switch {
			case r >= 0xd800 && r < 0xdc00:
				if i+11 < len(data) && data[i+6] == '\\' && data[i+7] == 'u' {
					if low := hex4(data[i+8 : i+12]); low >= 0xdc00 && low < 0xe000 {
						i += 11
						continue
					}
				}
				return true
			case r >= 0xdc00 && r < 0xe000:
				return true
			}
			i += 5
		}
	}
	return false
}

func hex4(b []byte) int {
	n, err := strconv.ParseUint(string(b), 16, 32)
	if err != nil {
		return -1
	}
	return int(n)
}
