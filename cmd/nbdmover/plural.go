package main

import "fmt"

// count is "1 backup", "2 backups": n and the noun, plural unless n is 1
// (nouns here take an s).
func count(n int, noun string) string {
	if n == 1 {
		return fmt.Sprintf("1 %s", noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
