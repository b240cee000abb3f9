package watch

import (
	"runtime"
	"sync"
	"weak"
)

// sharedValues holds one copy of each value that many cache entries share, read-only: the
// replicas of a workload carry the same labels and the same named ports, so a cluster has far
// fewer distinct ones than pods. The table holds its copies weakly, so a value no entry holds
// any more (its workload deleted or changed) is freed and forgotten.
type sharedValues[T any] struct {
	equal func(a, b *T) bool

	mu     sync.Mutex
	byHash map[uint64]weak.Pointer[T]
}

func newSharedValues[T any](equal func(a, b *T) bool) *sharedValues[T] {
	return &sharedValues[T]{equal: equal, byHash: make(map[uint64]weak.Pointer[T])}
}

// share returns the held value equal to v, whose hash is h, or else holds v and returns it.
// Whoever gets a held value must never change it. A value whose hash a different live value
// has already is returned as it is, not held: sharing only saves memory, and one slot per hash
// keeps the table small when values are not shared at all (a label unique to each pod).
func (s *sharedValues[T]) share(h uint64, v *T) *T {
	s.mu.Lock()
	defer s.mu.Unlock()
	if held := s.byHash[h].Value(); held != nil {
		if s.equal(held, v) {
			return held
		}
		return v
	}
	w := weak.Make(v)
	s.byHash[h] = w
	runtime.AddCleanup(v, s.forget, heldValue[T]{h, w})
	return v
}

type heldValue[T any] struct {
	hash uint64
	w    weak.Pointer[T]
}

// forget drops the table's entry of a value that was freed.
func (s *sharedValues[T]) forget(v heldValue[T]) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Another value may have taken the slot since; weak pointers stay comparable after
	// their value is freed.
	if s.byHash[v.hash] == v.w {
		delete(s.byHash, v.hash)
	}
}
