package main

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
)

// What makes the command line forgiving: durations in days and weeks,
// global flags after the command, --read-data 10% without the =, and
// "did you mean" for unknown flags and commands.

// duration is a flag value: a Go duration, or one with days and weeks
// (1d, 2w, 1d12h).
type duration struct{ d time.Duration }

func (v *duration) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	v.d = d
	return nil
}

func (v *duration) String() string {
	if v == nil {
		return ""
	}
	return formatDuration(v.d)
}

// durationFlag is a --NAME DURATION flag (value def, never shown as
// "0s" when there is none: shown as noDefault instead when set).
func durationFlag(name string, def time.Duration, usage, noDefault string) *cli.GenericFlag {
	f := &cli.GenericFlag{Name: name, Value: &duration{def}, Usage: usage}
	if def == 0 {
		f.DefaultText = noDefault
	}
	return f
}

// flagDuration reads a durationFlag.
func flagDuration(c *cli.Context, name string) time.Duration {
	if v, ok := c.Generic(name).(*duration); ok {
		return v.d
	}
	return 0
}

var dayWeek = regexp.MustCompile(`^(\d+)([dw])`)

// maxDuration bounds durations: a hundred years is plenty, and sums stay
// far from overflowing.
const maxDuration = 100 * 365 * 24 * time.Hour

// parseDuration parses a Go duration (72h, 90m) that may start with
// whole weeks and days (2w, 7d, 1w2d, 1d12h). Negative ones are refused.
func parseDuration(s string) (time.Duration, error) {
	bad := fmt.Errorf("duration %q: want numbers with units: s, m, h, d (days), w (weeks), e.g. 90m, 36h, 7d, 1w2d, 1d12h", s)
	var total time.Duration
	rest := s
	for {
		m := dayWeek.FindStringSubmatch(rest)
		if m == nil {
			break
		}
		n, err := strconv.ParseInt(m[1], 10, 64)
		unit := 24 * time.Hour
		if m[2] == "w" {
			unit *= 7
		}
		if err != nil || n > int64(maxDuration/unit) {
			return 0, fmt.Errorf("duration %q: more than a hundred years", s)
		}
		total += time.Duration(n) * unit
		rest = rest[len(m[0]):]
	}
	if rest != "" {
		d, err := time.ParseDuration(rest)
		if err != nil || d < 0 || d > maxDuration || strings.HasPrefix(rest, "-") || strings.HasPrefix(rest, "+") {
			return 0, bad
		}
		total += d // at most 2 x maxDuration: no overflow
	}
	if rest == s && s == "" || total > maxDuration {
		return 0, bad
	}
	return total, nil
}

// formatDuration writes d as parseDuration reads it, shortly: 7d, 36h,
// 2m, 1h30m.
func formatDuration(d time.Duration) string {
	if d != 0 && d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// globalFlags are the app's flags that take a value; they may be given
// anywhere on the command line.
var globalFlags = []string{"log-level", "log-format", "profile-dir"}

var percent = regexp.MustCompile(`^\d+%?$`)

// normalizeArgs rewrites a command line as urfave/cli wants it: global
// flags found after the command move before it, and "--read-data 10%"
// becomes "--read-data=10%" (a flag that is also a switch cannot take a
// separate value otherwise). Everything after "--" is left alone.
func normalizeArgs(args []string) []string {
	if len(args) < 2 {
		return args
	}
	var globals, rest []string
	for i := 1; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			rest = append(rest, args[i:]...)
			break
		}
		name, hasValue := flagName(a)
		switch {
		case slices.Contains(globalFlags, name) && (hasValue || i+1 < len(args) && !strings.HasPrefix(args[i+1], "-")):
			// (One without its value stays where it is, for urfave/cli
			// to say so, rather than take the next option as its value.)
			globals = append(globals, a)
			if !hasValue {
				globals = append(globals, args[i+1])
				i++
			}
		case name == "read-data" && !hasValue && i+1 < len(args) && percent.MatchString(args[i+1]):
			rest = append(rest, a+"="+args[i+1])
			i++
		default:
			rest = append(rest, a)
		}
	}
	if len(rest) > 2 && rest[0] == "files" && !strings.HasPrefix(rest[1], "-") {
		rest = append(rest[:2:2], flagsFirst(rest[2:], filesBoolFlags)...)
	}
	return append(append([]string{args[0]}, globals...), rest...)
}

// flagsFirst puts a command's flags (with their values) before its
// arguments, which follow a "--": urfave/cli stops at the first argument,
// and "files get /etc/hosts --output DIR" is how people write it. bools
// are the flags that take no value.
func flagsFirst(args, bools []string) []string {
	var flags, plain []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			plain = append(plain, args[i+1:]...)
			break
		}
		name, hasValue := flagName(a)
		switch {
		case name == "":
			plain = append(plain, a)
		case i+1 == len(args) && !hasValue && !slices.Contains(bools, name):
			// A flag without its value, last: alone, so that urfave/cli
			// says so (after "--" it would take that as the value).
			return append(flags, a)
		case hasValue || slices.Contains(bools, name):
			flags = append(flags, a)
		default:
			flags = append(flags, a, args[i+1])
			i++
		}
	}
	if len(plain) == 0 {
		return flags
	}
	return append(append(flags, "--"), plain...)
}

// flagName returns the name of a flag argument ("" if a is none) and
// whether it holds its value (--name=value).
func flagName(a string) (string, bool) {
	if !strings.HasPrefix(a, "-") || a == "-" {
		return "", false
	}
	name := strings.TrimLeft(a, "-")
	name, _, hasValue := strings.Cut(name, "=")
	return name, hasValue
}

// closest returns the candidate nearest to s by edit distance, if it is
// near enough to be a typo (at most a third of its length, and 3).
func closest(s string, candidates []string) string {
	best, bestD := "", 4
	for _, c := range candidates {
		d := editDistance(s, c)
		if d < bestD && d <= max(1, len(c)/3) {
			best, bestD = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

var (
	undefinedFlag = regexp.MustCompile(`flag provided but not defined: -+(\S+)`)
	flagNoValue   = regexp.MustCompile(`flag needs an argument: -+(\S+)`)
)

// usageErrorOf rewrites urfave/cli's and the flag package's usage errors
// with the flag as it is written (--name) and a suggestion.
func usageErrorOf(c *cli.Context, err error) error {
	where := "nbdmover"
	flags := c.App.Flags
	if c.Command != nil && c.Command.Name != "" && c.Command.Name != c.App.Name {
		flags, where = c.Command.Flags, "nbdmover "+c.Command.Name
		for _, l := range c.Lineage()[1:] { // a subcommand's parent (files ls)
			if l.Command != nil && l.Command.Name != "" && l.Command.Name != "nbdmover" && l.Command != c.Command {
				where = "nbdmover " + l.Command.Name + " " + c.Command.Name
				break
			}
		}
	}
	if m := flagNoValue.FindStringSubmatch(err.Error()); m != nil {
		return usagef("--%s needs a value (%s --help says what it takes)", m[1], where)
	}
	m := undefinedFlag.FindStringSubmatch(err.Error())
	if m == nil {
		return usageError{err}
	}
	var names []string
	for _, f := range flags {
		names = append(names, f.Names()...)
	}
	hint := ""
	if s := closest(m[1], names); s != "" {
		hint = fmt.Sprintf(": did you mean --%s?", s)
	}
	return usagef("unknown option --%s%s (%s --help lists them)", m[1], hint, where)
}

// unknownSubcommand is the error for a subcommand of parent that does
// not exist.
func unknownSubcommand(parent *cli.Command, name string) error {
	var names []string
	for _, c := range parent.Subcommands {
		names = append(names, c.Names()...)
	}
	where := "nbdmover " + parent.Name
	if s := closest(name, names); s != "" {
		return usagef("unknown command %q: did you mean %s %s? (%s --help lists them)", name, where, s, where)
	}
	return usagef("unknown command %q (%s --help lists them)", name, where)
}

// unknownCommand is the error for a command that does not exist.
func unknownCommand(app *cli.App, name string) error {
	var names []string
	for _, c := range app.Commands {
		names = append(names, c.Names()...)
	}
	if s := closest(name, names); s != "" {
		return usagef("unknown command %q: did you mean %s? (nbdmover --help lists them)", name, s)
	}
	return usagef("unknown command %q (nbdmover --help lists them)", name)
}
