package sink

// WithoutOpenat2 makes the local store resolve paths by its walk of
// O_NOFOLLOW opens, as on a kernel without openat2, until the returned
// function is called.
func WithoutOpenat2() (restore func()) {
	was := noOpenat2.Load()
	noOpenat2.Store(true)
	return func() { noOpenat2.Store(was) }
}
