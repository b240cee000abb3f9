package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// LoadFile reads a state file; see Load.
func LoadFile(path string) (*State, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read state: %w", err)
	}
	defer f.Close()
	return Load(f, path)
}

// Load reads the cluster state from r: multi-document YAML (or JSON) holding Namespaces
// (v1), Pods (v1) and NetworkPolicies (networking.k8s.io/v1), and any of `kind: List`,
// PodList, NamespaceList and NetworkPolicyList wrapping them — which is what
// `kubectl get pods,namespaces,networkpolicies -A -o yaml` prints. name is used in messages.
//
// Decoding is strict, as the API server's is: an unknown or duplicated field is an error naming
// it, so a misspelt `podSelectr` cannot silently become "select every pod". Objects of other
// kinds are skipped; the returned notes name them (and other things worth knowing that are not
// errors). The state is then defaulted (Default) and validated (Validate); every problem is
// returned at once, each prefixed with the file, the document (1-based, counting only
// non-empty documents; items[i] for an object inside a List), its kind and namespace/name, and
// then the field path.
//
// An input without a single document is an error rather than an empty state, because an empty
// state allows everything and a truncated file must not do that. Write an empty `kind: List`
// to mean "no objects".
func Load(r io.Reader, name string) (*State, []string, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: read: %w", name, err)
	}
	l := loader{file: name, st: &State{}, ignored: make(map[string]*ignoredKind)}
	docs := splitDocuments(data)
	n := 0
	for _, d := range docs {
		j, err := toJSON(d.data)
		if err != nil {
			n++
			l.fail(origin{doc: n, line: d.line, item: -1}, fmt.Errorf("invalid YAML: %s", absoluteLines(err.Error(), d.line)))
			continue
		}
		if t := bytes.TrimSpace(j); len(t) == 0 || string(t) == "null" {
			continue // only comments or blank lines: not a document anyone meant
		}
		n++
		l.document(j, origin{doc: n, line: d.line, item: -1})
	}
	if n == 0 {
		return nil, nil, fmt.Errorf("%s: no objects found; an empty state would allow all traffic, so if that is really meant, write `apiVersion: v1` and `kind: List` with `items: []`", name)
	}
	for _, k := range l.ignoredOrder {
		ig := l.ignored[k]
		l.notes = append(l.notes, fmt.Sprintf("%s: ignored %d %s object(s) (sluice reads Namespace, Pod and NetworkPolicy); the first is %s",
			name, ig.count, k, ig.first))
	}
	// Objects that decoded (even with unknown fields) are validated too, so one run reports
	// every problem in the file.
	Default(l.st)
	verr := validateState(l.st, func(kind string, i int) string {
		switch kind {
		case "Namespace":
			return l.nsOrigin[i].String()
		case "Pod":
			return l.podOrigin[i].String()
		default:
			return l.npOrigin[i].String()
		}
	})
	if len(l.errs) > 0 || verr != nil {
		return nil, l.notes, errors.Join(append(l.errs, verr)...)
	}
	l.notes = append(l.notes, l.stateNotes()...)
	return l.st, l.notes, nil
}

// toJSON converts one YAML document to JSON. JSON input (kubectl get -o json) skips the YAML
// parser, which costs several times the JSON decode; duplicate keys are caught by the strict
// decode either way.
func toJSON(doc []byte) ([]byte, error) {
	if t := bytes.TrimSpace(doc); len(t) > 0 && t[0] == '{' && json.Valid(t) {
		return t, nil
	}
	return yaml.YAMLToJSONStrict(doc)
}

// origin says where an object came from, for messages.
type origin struct {
	file           string
	doc, line      int
	item           int // index in the items of a List; -1 for a top-level document
	kind, ns, name string
}

func (o origin) String() string { return o.file + ": " + o.inFile() }

// inFile is String without the file name.
func (o origin) inFile() string {
	var b strings.Builder
	b.WriteString("document ")
	b.WriteString(strconv.Itoa(o.doc))
	if o.item >= 0 {
		fmt.Fprintf(&b, " items[%d]", o.item)
	}
	var what []string
	if o.kind != "" {
		id := o.kind
		switch {
		case o.ns != "" && o.name != "":
			id += " " + o.ns + "/" + o.name
		case o.name != "":
			id += " " + o.name
		}
		what = append(what, id)
	}
	if o.item < 0 && o.line > 0 {
		what = append(what, "line "+strconv.Itoa(o.line))
	}
	if len(what) > 0 {
		b.WriteString(" (" + strings.Join(what, ", ") + ")")
	}
	return b.String()
}

type ignoredKind struct {
	count int
	first string
}

type loader struct {
	file                string
	st                  *State
	nsOrigin, podOrigin []origin
	npOrigin            []origin
	errs                []error
	notes               []string
	ignored             map[string]*ignoredKind
	ignoredOrder        []string
}

func (l *loader) fail(o origin, err error) {
	o.file = l.file
	if len(l.errs) >= maxReportedErrors {
		if len(l.errs) == maxReportedErrors {
			l.errs = append(l.errs, errors.New("... more problems not shown; fix the ones above and run again"))
		}
		return
	}
	l.errs = append(l.errs, fmt.Errorf("%s: %w", o, err))
}

// header is the part of an object read before its kind is known. It is decoded leniently so
// that the strict decode's errors can name the object.
type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
}

var listElem = map[string]struct{ apiVersion, kind string }{
	"PodList":           {"v1", "Pod"},
	"NamespaceList":     {"v1", "Namespace"},
	"NetworkPolicyList": {"networking.k8s.io/v1", "NetworkPolicy"},
}

var wantAPIVersion = map[string]string{
	"Pod":           "v1",
	"Namespace":     "v1",
	"NetworkPolicy": "networking.k8s.io/v1",
	"List":          "v1",
}

func (l *loader) document(j []byte, o origin) {
	o.file = l.file
	if j[0] != '{' {
		l.fail(o, errors.New("expected a Kubernetes object (a mapping with apiVersion and kind), found a YAML list or scalar"))
		return
	}
	var h header
	_ = json.Unmarshal(j, &h) // best effort: only used to name the object
	l.dispatch(j, o, h)
}

// dispatch handles one object whose header has been read.
func (l *loader) dispatch(j []byte, o origin, h header) {
	o.kind, o.ns, o.name = h.Kind, h.Metadata.Namespace, h.Metadata.Name
	if h.Kind == "" {
		l.fail(o, errors.New("kind is required (Namespace, Pod, NetworkPolicy or List)"))
		return
	}
	if want, ok := wantAPIVersion[h.Kind]; ok && h.APIVersion != want {
		if h.APIVersion == "" {
			l.fail(o, fmt.Errorf("apiVersion is required; for %s it is %s", h.Kind, want))
		} else {
			l.fail(o, fmt.Errorf("apiVersion %s of %s is not supported; sluice reads %s (convert the object, e.g. with kubectl get -o yaml from a current cluster)", h.APIVersion, h.Kind, want))
		}
		return
	}
	if elem, ok := listElem[h.Kind]; ok || h.Kind == "List" {
		if want := elem.apiVersion; ok && h.APIVersion != "v1" && h.APIVersion != want {
			l.fail(o, fmt.Errorf("apiVersion %s of %s is not supported; use %s", h.APIVersion, h.Kind, want))
			return
		}
		l.list(j, o, elem.apiVersion, elem.kind)
		return
	}
	l.object(j, o, h)
}

func (l *loader) list(j []byte, o origin, elemAPIVersion, elemKind string) {
	if o.item >= 0 {
		l.fail(o, errors.New("a List inside a List is not supported; flatten the items into one list"))
		return
	}
	var list struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        metav1.ListMeta   `json:"metadata"`
		Items           []json.RawMessage `json:"items"`
	}
	if !l.strict(j, &list, o) {
		return
	}
	for i, item := range list.Items {
		itemOrigin := o
		itemOrigin.item = i
		t := bytes.TrimSpace(item)
		if len(t) == 0 || t[0] != '{' {
			itemOrigin.kind, itemOrigin.ns, itemOrigin.name = "", "", ""
			l.fail(itemOrigin, errors.New("a list item must be an object with apiVersion and kind"))
			continue
		}
		var h header
		_ = json.Unmarshal(item, &h)
		if h.Kind == "" && elemKind != "" {
			// The API server omits apiVersion and kind on the items of a typed list; the typed
			// decode does not need them.
			h.Kind, h.APIVersion = elemKind, elemAPIVersion
		}
		if elemKind != "" && h.Kind != elemKind {
			itemOrigin.kind, itemOrigin.ns, itemOrigin.name = h.Kind, h.Metadata.Namespace, h.Metadata.Name
			l.fail(itemOrigin, fmt.Errorf("a %s may hold only %s objects", o.kind, elemKind))
			continue
		}
		l.dispatch(item, itemOrigin, h)
	}
}

func (l *loader) object(j []byte, o origin, h header) {
	switch h.Kind {
	case "Namespace":
		var ns corev1.Namespace
		if l.strict(j, &ns, o) {
			l.st.Namespaces = append(l.st.Namespaces, ns)
			l.nsOrigin = append(l.nsOrigin, o)
		}
	case "Pod":
		var p corev1.Pod
		if l.strict(j, &p, o) {
			l.st.Pods = append(l.st.Pods, p)
			l.podOrigin = append(l.podOrigin, o)
		}
	case "NetworkPolicy":
		var np networkingv1.NetworkPolicy
		if l.strict(j, &np, o) {
			l.st.Policies = append(l.st.Policies, np)
			l.npOrigin = append(l.npOrigin, o)
		}
	default:
		ig := l.ignored[h.Kind]
		if ig == nil {
			ig = &ignoredKind{first: o.inFile()}
			l.ignored[h.Kind] = ig
			l.ignoredOrder = append(l.ignoredOrder, h.Kind)
		}
		ig.count++
	}
}

// strict decodes j into v as the API server does: case-sensitive field names, and unknown or
// duplicated fields are errors (each named with its path).
func (l *loader) strict(j []byte, v any, o origin) bool {
	strictErrs, err := sigsjson.UnmarshalStrict(j, v, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		l.fail(o, fmt.Errorf("%s (check the field's type against the Kubernetes API reference)", strings.TrimPrefix(err.Error(), "json: ")))
		return false
	}
	for _, e := range strictErrs {
		l.fail(o, fmt.Errorf("%s (not a field of %s; check spelling, case and indentation)", strings.TrimPrefix(e.Error(), "json: "), o.kind))
	}
	// With only unknown or duplicate fields the object is otherwise complete: keep it so that
	// validation reports its other problems in the same run (Load fails either way).
	return true
}

// stateNotes are observations about a valid state that are worth a line but not an error.
func (l *loader) stateNotes() []string {
	var notes []string
	defined := make(map[string]bool, len(l.st.Namespaces))
	for _, ns := range l.st.Namespaces {
		defined[ns.Name] = true
	}
	var missing []string
	use := func(ns string) {
		if !defined[ns] {
			defined[ns] = true
			missing = append(missing, ns)
		}
	}
	owner := make(map[netip.Addr]int)
	for i := range l.st.Pods {
		p := &l.st.Pods[i]
		use(p.Namespace)
		if !Participates(p) {
			continue
		}
		for _, a := range PodAddrs(p) {
			if j, ok := owner[a]; ok {
				notes = append(notes, fmt.Sprintf("%s: IP %s is also the IP of %s; two running pods should not share an IP; sluice gives it to a pod that is not terminating, then to one on this node, then to a Running one, then to the first in namespace/name order",
					l.podOrigin[i], a, l.podOrigin[j]))
				continue
			}
			owner[a] = i
		}
	}
	for i := range l.st.Policies {
		use(l.st.Policies[i].Namespace)
	}
	if len(missing) > 0 && len(l.st.Namespaces) > 0 {
		slices.Sort(missing)
		notes = append(notes, fmt.Sprintf("%s: namespace(s) %s are used but not defined; they are assumed to carry only the label %s=<name>, which matters for namespaceSelectors",
			l.file, strings.Join(missing, ", "), corev1.LabelMetadataName))
	}
	return notes
}

// splitDocuments cuts a YAML stream at `---` separator lines, remembering the line each
// document starts on so errors can point into the file.
type rawDocument struct {
	line int // 1-based line of the document's first line
	data []byte
}

func splitDocuments(b []byte) []rawDocument {
	var docs []rawDocument
	start, startLine, line := 0, 1, 1
	for pos := 0; pos < len(b); {
		end := bytes.IndexByte(b[pos:], '\n')
		next := len(b)
		if end >= 0 {
			next = pos + end + 1
		}
		text := bytes.TrimRight(b[pos:next], "\r\n")
		if isSeparator(text) {
			docs = append(docs, rawDocument{line: startLine, data: b[start:pos]})
			start, startLine = next, line+1
		}
		pos = next
		line++
	}
	return append(docs, rawDocument{line: startLine, data: b[start:]})
}

func isSeparator(line []byte) bool {
	if !bytes.HasPrefix(line, []byte("---")) {
		return false
	}
	rest := bytes.TrimSpace(line[3:])
	return len(rest) == 0 || rest[0] == '#'
}

var yamlLine = regexp.MustCompile(`line (\d+)`)

// absoluteLines rewrites the document-relative "line N" of a YAML parser error to the line of
// the file.
func absoluteLines(msg string, docLine int) string {
	return yamlLine.ReplaceAllStringFunc(msg, func(m string) string {
		n, err := strconv.Atoi(m[len("line "):])
		if err != nil {
			return m
		}
		return "line " + strconv.Itoa(n+docLine-1)
	})
}
