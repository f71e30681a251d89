package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// A catalog (catalog/<domain>/<rank>-<id>, a meta blob of JSON) holds the
// manifests of a domain up to and including backup <id>, so that listing
// many backups reads one object instead of one per backup. It is a cache:
// the manifests stay the truth (a listing takes from a catalog only the
// manifests that still exist, and reads the ones it lacks). A backup writes
// a new catalog when catalogEvery manifests or more are newer than the
// newest one, and removes the older catalogs.
const catalogEvery = 64

type catalog struct {
	Version   int                  `json:"version"`
	Domain    string               `json:"domain"`
	Manifests map[string]*Manifest `json:"manifests"` // by manifest key
	Sizes     map[string]int64     `json:"sizes"`     // of the manifest objects, by key
}

// cached is what catalogs hold of a manifest.
type cached struct {
	m    *Manifest
	size int64
}

func catalogKey(domain, id string) string {
	return "catalog/" + strings.TrimPrefix(ManifestKey(domain, id), "manifests/")
}

// parseCatalogKey returns the domain and id a catalog key names, or ok
// false for a key that is not one.
func parseCatalogKey(key string) (domain, id string, ok bool) {
	rest, found := strings.CutPrefix(key, "catalog/")
	if !found {
		return "", "", false
	}
	return parseManifestKey("manifests/" + rest)
}

// addTo adds the catalog's manifests to cache.
func (c *catalog) addTo(cache map[string]cached) {
	for k, m := range c.Manifests {
		cache[k] = cached{m, c.Sizes[k]}
	}
}

// Backups returns the committed backups of domain (of every domain when
// domain is ""), oldest first. A manifest that cannot be read or decoded
// (damaged, or written by a newer nbdmover) does not hide the others: it
// is left out and reported in skipped. Only a failing store is an error.
// It costs a listing of the manifests and of the catalogs, a read of each
// domain's newest catalog, and a read of each manifest the catalogs lack.
func (r *Repo) Backups(ctx context.Context, domain string) (ms []*Manifest, skipped []Problem, err error) {
	return r.backups(ctx, domain, true)
}

// backups lists like Backups, from the catalogs when useCatalogs (verify
// reads every manifest instead).
func (r *Repo) backups(ctx context.Context, domain string, useCatalogs bool) (ms []*Manifest, skipped []Problem, err error) {
	if domain != "" {
		if err := ValidName("domain", domain); err != nil {
			return nil, nil, err
		}
	}
	keys, err := r.manifestKeys(ctx, domain)
	if err != nil {
		return nil, nil, err
	}
	cache := map[string]cached{}
	if useCatalogs {
		if cache, err = r.catalogs(ctx, domain); err != nil {
			return nil, nil, err
		}
	}
	ms, skipped, err = r.manifests(ctx, keys, cache)
	if err != nil {
		return nil, nil, err
	}
	sort.Slice(ms, func(i, j int) bool { // ids are creation times
		if ms[i].ID != ms[j].ID {
			return ms[i].ID < ms[j].ID
		}
		return ms[i].Domain < ms[j].Domain
	})
	sort.Slice(skipped, func(i, j int) bool { return skipped[i].Object < skipped[j].Object })
	return ms, skipped, nil
}

// manifestKeys lists the manifest objects of domain (of every domain when
// domain is ""), newest first within a domain.
func (r *Repo) manifestKeys(ctx context.Context, domain string) ([]sink.ObjectInfo, error) {
	prefix := "manifests/"
	if domain != "" {
		prefix += domain + "/"
	}
	var keys []sink.ObjectInfo
	err := r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
		if d, _, ok := parseManifestKey(o.Key); ok && (domain == "" || d == domain) {
			keys = append(keys, o)
		}
		return nil
	})
	return keys, err
}

// manifests returns the manifests listed, from cache where it has them
// at the size listed (a manifest object rewritten since is read).
func (r *Repo) manifests(ctx context.Context, keys []sink.ObjectInfo, cache map[string]cached) ([]*Manifest, []Problem, error) {
	var mu sync.Mutex
	var ms []*Manifest
	var skipped []Problem
	var missing []string
	for _, o := range keys {
		if c, ok := cache[o.Key]; ok && c.size == o.Size {
			ms = append(ms, c.m)
		} else {
			missing = append(missing, o.Key)
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, key := range missing {
		g.Go(func() error {
			m, err := r.loadManifest(gctx, key)
			if isStoreFailure(err) {
				return err
			}
			if isNotFound(err) {
				return nil // forgotten since the listing
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				d, id, _ := parseManifestKey(key)
				skipped = append(skipped, Problem{Object: key, Backup: d + "/" + id, Problem: err.Error()})
				return nil
			}
			ms = append(ms, m)
			return nil
		})
	}
	return ms, skipped, g.Wait()
}

// catalogs returns the manifests of the newest catalog of each domain (of
// domain, when not ""), by key. A catalog that cannot be read is passed
// over: it is only a cache.
func (r *Repo) catalogs(ctx context.Context, domain string) (map[string]cached, error) {
	prefix := "catalog/"
	if domain != "" {
		prefix += domain + "/"
	}
	newest := map[string]string{} // domain -> key of its newest catalog (the first listed)
	if err := r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
		if d, _, ok := parseCatalogKey(o.Key); ok && newest[d] == "" {
			newest[d] = o.Key
		}
		return nil
	}); err != nil {
		return nil, err
	}
	out := map[string]cached{}
	for d, key := range newest {
		c, err := r.loadCatalog(ctx, key, d)
		if isStoreFailure(err) {
			return nil, err
		}
		if err == nil {
			c.addTo(out)
		}
	}
	return out, nil
}

func (r *Repo) loadCatalog(ctx context.Context, key, domain string) (*catalog, error) {
	var c catalog
	if err := r.getMeta(ctx, key, &c); err != nil {
		return nil, err
	}
	if c.Version != formatVersion || c.Domain != domain {
		return nil, fmt.Errorf("%s: catalog of format %d for %s", key, c.Version, c.Domain)
	}
	for k, m := range c.Manifests {
		if m == nil || m.check() != nil || m.Key() != k || m.Domain != domain || c.Sizes[k] <= 0 {
			return nil, fmt.Errorf("%s: a catalog entry is damaged: %s", key, k)
		}
	}
	return &c, nil
}

// catalogDue tells, from two listings that stop early (both list newest
// first), whether catalogEvery or more manifests are newer than the
// domain's newest catalog: a backup's usual cost is two listing requests.
func (r *Repo) catalogDue(ctx context.Context, domain string) (bool, error) {
	stop := errors.New("stop")
	covered := ""
	err := r.store.List(ctx, "catalog/"+domain+"/", func(o sink.ObjectInfo) error {
		if _, id, ok := parseCatalogKey(o.Key); ok {
			covered = id
			return stop
		}
		return nil
	})
	if err != nil && !errors.Is(err, stop) {
		return false, err
	}
	newer := 0
	err = r.store.List(ctx, "manifests/"+domain+"/", func(o sink.ObjectInfo) error {
		_, id, ok := parseManifestKey(o.Key)
		switch {
		case !ok:
		case id <= covered:
			return stop
		default:
			if newer++; newer >= catalogEvery {
				return stop
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, stop) {
		return false, err
	}
	return newer >= catalogEvery, nil
}

// UpdateCatalog writes a new catalog of the domain when catalogEvery or
// more of its manifests are newer than the newest one (catalogDue), and
// then removes the older catalogs. A backup calls it after its commit; a
// failure leaves listing slower, never wrong.
func (r *Repo) UpdateCatalog(ctx context.Context, domain string) error {
	if err := ValidName("domain", domain); err != nil {
		return err
	}
	if due, err := r.catalogDue(ctx, domain); err != nil || !due {
		return err
	}
	keys, err := r.manifestKeys(ctx, domain)
	if err != nil || len(keys) == 0 {
		return err
	}
	var old []string
	if err := r.store.List(ctx, "catalog/"+domain+"/", func(o sink.ObjectInfo) error {
		old = append(old, o.Key)
		return nil
	}); err != nil {
		return err
	}
	cache := map[string]cached{}
	if len(old) > 0 {
		if c, err := r.loadCatalog(ctx, old[0], domain); err == nil {
			c.addTo(cache)
		}
	}
	missing := 0
	for _, o := range keys {
		if c, ok := cache[o.Key]; !ok || c.size != o.Size {
			missing++
		}
	}
	if missing < catalogEvery {
		return nil
	}
	ms, _, err := r.manifests(ctx, keys, cache)
	if err != nil {
		return err
	}
	sizes := map[string]int64{}
	for _, o := range keys {
		sizes[o.Key] = o.Size
	}
	c := catalog{Version: formatVersion, Domain: domain, Manifests: map[string]*Manifest{}, Sizes: map[string]int64{}}
	for _, m := range ms {
		c.Manifests[m.Key()], c.Sizes[m.Key()] = m, sizes[m.Key()]
	}
	b, err := json.Marshal(c)
	if err != nil || len(b) > maxCatalog {
		return err // too many backups for one catalog: listing reads manifests
	}
	_, newestID, _ := parseManifestKey(keys[0].Key)
	key := catalogKey(domain, newestID)
	if err := r.store.Put(ctx, key, r.encodeMeta(key, b)); err != nil {
		return err
	}
	for _, k := range old {
		if k != key {
			if err := r.store.Delete(ctx, k); err != nil {
				return err
			}
		}
	}
	return nil
}
