package chunker

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"hash"
	"sync"
)

// Secret holds the keys of an encrypted repository: one that names chunks
// and objects (HMAC-SHA256 of the plaintext, so that equal data still
// deduplicates but a name tells nothing about content) and one that
// encrypts blobs (AES-256-GCM). It is safe for concurrent use.
type Secret struct {
	aead cipher.AEAD
	macs sync.Pool // hash.Hash: HMAC-SHA256 under the naming key
}

// SecretKeySize is the size of each of a Secret's two keys.
const SecretKeySize = 32

// NewSecret builds a Secret from its naming and data keys (each
// SecretKeySize bytes). The caller may zero both slices afterwards: the
// naming key is copied, the data key expanded into the cipher.
func NewSecret(idKey, dataKey []byte) (*Secret, error) {
	if len(idKey) != SecretKeySize || len(dataKey) != SecretKeySize {
		return nil, errors.New("chunker: a repository key is 32 bytes")
	}
	block, err := aes.NewCipher(dataKey)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	key := append([]byte(nil), idKey...)
	s := &Secret{aead: aead}
	s.macs.New = func() any { return hmac.New(sha256.New, key) }
	return s, nil
}

// Sum is the keyed digest of p: HMAC-SHA256 under the naming key.
func (s *Secret) Sum(p []byte) Digest {
	m := s.macs.Get().(hash.Hash)
	m.Reset()
	m.Write(p)
	var d Digest
	m.Sum(d[:0])
	s.macs.Put(m)
	return d
}
