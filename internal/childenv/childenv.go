// Package childenv is the environment of the processes nbdmover starts
// (a password command, qemu-img, qemu-nbd): its own, without the secrets
// it was given. A child that needs one of them gets it some other way (a
// password command with cloud credentials reads its own profile).
package childenv

import (
	"os"
	"strings"
)

// Secrets are the variables no child sees.
var Secrets = []string{"NBDMOVER_PASSWORD", "NBDMOVER_NEW_PASSWORD", "NBDMOVER_TOKEN",
	"NBDMOVER_FROM_PASSWORD", "NBDMOVER_TO_PASSWORD", "NBDMOVER_COPY_TO_PASSWORD",
	"AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN"} // minio-go reads AWS_SECRET_KEY too

// Env returns the process's environment without Secrets.
func Env() []string {
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		secret := false
		for _, s := range Secrets {
			secret = secret || name == s
		}
		if !secret {
			out = append(out, kv)
		}
	}
	return out
}
