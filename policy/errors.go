package policy

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation/field"
)

// PolicyError is one NetworkPolicy that cannot be compiled as written: an invalid selector,
// CIDR, port or policy type, or a size beyond the compiler's bounds (see MaxRules).
type PolicyError struct {
	Policy string // namespace/name
	Field  string // path of the offending field, e.g. spec.ingress[0].from[1].ipBlock.cidr
	Err    error
}

func (e *PolicyError) Error() string {
	return "NetworkPolicy " + e.Policy + ": " + e.Field + ": " + e.Err.Error()
}

func (e *PolicyError) Unwrap() error { return e.Err }

// CompileError is Compile's error: every policy of the state that did not compile, in
// (namespace, name) order. errors.As finds it, and each *PolicyError through it.
type CompileError struct {
	Policies []PolicyError
}

func (e *CompileError) Error() string {
	lines := make([]string, len(e.Policies))
	for i := range e.Policies {
		lines[i] = e.Policies[i].Error()
	}
	return strings.Join(lines, "\n")
}

func (e *CompileError) Unwrap() []error {
	out := make([]error, len(e.Policies))
	for i := range e.Policies {
		out[i] = &e.Policies[i]
	}
	return out
}

// fieldError is a PolicyError before it is known which policy it belongs to.
func fieldError(path *field.Path, format string, args ...any) *PolicyError {
	return &PolicyError{Field: path.String(), Err: fmt.Errorf(format, args...)}
}
