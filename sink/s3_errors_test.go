package sink

import (
	"context"
	"errors"
	"testing"

	"github.com/minio/minio-go/v7"
)

// How S3 answers map to errors. A fake answer: MinIO does not send a 409
// ConditionalRequestConflict on demand (S3 sends it to the loser of two
// overlapping conditional writes).
func TestS3ErrorMapping(t *testing.T) {
	s := &S3{location: "s3://b", bucket: "b"}
	for _, tc := range []struct {
		code      string
		status    int
		want      error
		transient bool
	}{
		{"PreconditionFailed", 412, ErrExists, false},
		{"ConditionalRequestConflict", 409, nil, true},
		{"NoSuchKey", 404, ErrNotFound, false},
		{"SlowDown", 503, nil, true},
		{"AccessDenied", 403, nil, false},
	} {
		err := s.fail(context.Background(), "create", "k", minio.ErrorResponse{Code: tc.code, StatusCode: tc.status})
		var e *Error
		if !errors.As(err, &e) || e.Transient != tc.transient || tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: %v (transient %v)", tc.code, err, e != nil && e.Transient)
		}
	}
}
