package main

import "github.com/nbdmover/nbdmover/internal/units"

// parseSize parses "4MiB", "256KiB", "1GiB" or a plain byte count.
func parseSize(s string) (int64, error) { return units.ParseSize(s) }
