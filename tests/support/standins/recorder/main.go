// A registry-shaped HTTP server that records how Go reads each request it receives.
//
// The differential tests (tests/unit/test_differential.py) put it behind the gateway in place of
// the backend: the backends (Distribution, Zot) are Go programs, so what this server's
// net/http, net/url and encoding/json make of a request is what a backend would act on. For
// every request it records the raw request target, Go's path and query parse, the form values
// Distribution reads with FormValue (mount, from, digest), and, for a manifest PUT, the
// digests encoding/json finds in the image-spec fields. Tests read the log at
// GET /_recorder/log and clear it with POST /_recorder/reset (straight to this server, never
// through the gateway).
//
// Usage: recorder <listen address>
package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
)

type descriptor struct {
	MediaType string `json:"mediaType,omitempty"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

// The fields of image-spec's Manifest and Index (and Docker schema 2) that reference content.
type manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType,omitempty"`
	Config        *descriptor  `json:"config,omitempty"`
	Layers        []descriptor `json:"layers,omitempty"`
	Manifests     []descriptor `json:"manifests,omitempty"`
	Blobs         []descriptor `json:"blobs,omitempty"`
	Subject       *descriptor  `json:"subject,omitempty"`
}

type record struct {
	Method      string              `json:"method"`
	RequestURI  string              `json:"request_uri"`
	Path        string              `json:"path"`
	RawQuery    string              `json:"raw_query"`
	Query       map[string][]string `json:"query"`
	QueryError  string              `json:"query_error,omitempty"`
	Form        map[string]string   `json:"form"` // what Distribution's FormValue returns
	ContentType string              `json:"content_type"`
	BodyLength  int                 `json:"body_length"`
	References  []string            `json:"references,omitempty"` // manifest PUT: Go's reading
	Subject     string              `json:"subject,omitempty"`
	JSONError   string              `json:"json_error,omitempty"`
}

var (
	mu      sync.Mutex
	records = []record{}
)

func digestOf(body []byte) string {
	return fmt.Sprintf("sha256:%x", sha256.Sum256(body))
}

func readManifest(body []byte, r *record) {
	var m manifest
	if err := json.Unmarshal(body, &m); err != nil {
		r.JSONError = err.Error()
		return
	}
	refs := []string{}
	if m.Config != nil {
		refs = append(refs, m.Config.Digest)
	}
	for _, list := range [][]descriptor{m.Layers, m.Manifests, m.Blobs} {
		for _, d := range list {
			refs = append(refs, d.Digest)
		}
	}
	r.References = refs
	if m.Subject != nil {
		r.Subject = m.Subject.Digest
	}
}

func answer(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	io.WriteString(w, body)
}

func serve(w http.ResponseWriter, req *http.Request) {
	if strings.HasPrefix(req.URL.Path, "/_recorder/") {
		mu.Lock()
		defer mu.Unlock()
		if req.Method == http.MethodPost {
			records = []record{}
		}
		json.NewEncoder(w).Encode(records)
		return
	}
	body, _ := io.ReadAll(io.LimitReader(req.Body, 8<<20))
	rec := record{
		Method:      req.Method,
		RequestURI:  req.RequestURI,
		Path:        req.URL.Path,
		RawQuery:    req.URL.RawQuery,
		ContentType: req.Header.Get("Content-Type"),
		BodyLength:  len(body),
		Form:        map[string]string{},
	}
	query, err := url.ParseQuery(req.URL.RawQuery) // what r.URL.Query() gives, and its error
	rec.Query = query
	if err != nil {
		rec.QueryError = err.Error()
	}
	// FormValue as Distribution calls it; the body was read above, so restore it first.
	req.Body = io.NopCloser(strings.NewReader(string(body)))
	for _, key := range []string{"mount", "from", "digest", "_state", "n", "last"} {
		if v := req.FormValue(key); v != "" {
			rec.Form[key] = v
		}
	}
	isManifest := strings.Contains(req.URL.Path, "/manifests/")
	if isManifest && req.Method == http.MethodPut {
		readManifest(body, &rec)
	}
	mu.Lock()
	records = append(records, rec)
	mu.Unlock()

	switch {
	case isManifest && req.Method == http.MethodPut:
		w.Header().Set("Docker-Content-Digest", digestOf(body))
		answer(w, http.StatusCreated, "")
	case strings.HasSuffix(req.URL.Path, "/blobs/uploads/") && req.Method == http.MethodPost:
		w.Header().Set("Location", req.URL.Path+"recorded-upload")
		answer(w, http.StatusAccepted, "")
	case strings.HasSuffix(req.URL.Path, "/tags/list"):
		answer(w, http.StatusOK, `{"name":"x","tags":[]}`)
	default:
		answer(w, http.StatusOK, `{}`)
	}
}

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: recorder <listen address>")
	}
	log.Fatal(http.ListenAndServe(os.Args[1], http.HandlerFunc(serve)))
}
