package test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// getMetrics scrapes url (through sock when not empty) and parses the
// answer with Prometheus' exposition-format parser.
func getMetrics(t *testing.T, url, sock string) map[string]*dto.MetricFamily {
	t.Helper()
	cl := http.DefaultClient
	if sock != "" {
		cl = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	}
	resp, err := cl.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// metricValue is the value of the family's metric whose labels include
// the given ones (name=value pairs), or -1.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	for _, m := range fams[name].GetMetric() {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		ok := true
		for i := 0; i+1 < len(labels); i += 2 {
			ok = ok && have[labels[i]] == labels[i+1]
		}
		if !ok {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

// TestMetricsEndpoint: serve --metrics exports the traffic qemu-io sent,
// with the cache's and the flusher's state, on its own listener and on
// the control socket.
func TestMetricsEndpoint(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	backing, cache := cacheFiles(t, 64*mib, 16*mib)
	ctlSock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", backing, "--cache", cache, "--format", "--control", "unix:"+ctlSock, "--metrics", "127.0.0.1:0")
	defer s.stop()
	m := regexp.MustCompile(`metrics on (http://\S+/metrics)`).FindStringSubmatch(s.stdout.String())
	if m == nil {
		t.Fatalf("no metrics address printed:\n%s", s.stdout)
	}
	url := m[1]
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x5a 0 3M", "-c", "flush", "-c", "read -P 0x5a 1M 1M", s.uri)
	run(t, qemuIO, "-f", "raw", "-c", "write 0 512", s.uri)

	fams := getMetrics(t, url, "")
	for _, c := range []struct {
		name   string
		labels []string
		want   func(float64) bool
		what   string
	}{
		{"nbdcache_nbd_bytes_written_total", nil, func(v float64) bool { return v == 3*mib+512 }, "3 MiB + 512 B"},
		{"nbdcache_nbd_bytes_read_total", nil, func(v float64) bool { return v >= mib }, ">= 1 MiB"},
		{"nbdcache_nbd_request_duration_seconds", []string{"command", "WRITE"}, func(v float64) bool { return v >= 2 }, ">= 2 WRITEs"},
		{"nbdcache_nbd_request_duration_seconds", []string{"command", "FLUSH"}, func(v float64) bool { return v >= 1 }, ">= 1 FLUSH"},
		{"nbdcache_cache_write_bytes_total", nil, func(v float64) bool { return v == 3*mib+512 }, "3 MiB + 512 B"},
		{"nbdcache_cache_capacity_bytes", nil, func(v float64) bool { return v > 0 && v < 16*mib }, "0 < v < 16 MiB"},
		{"nbdcache_cache_mode", []string{"mode", "writeback"}, func(v float64) bool { return v == 1 }, "1"},
		{"nbdcache_writeback_target", nil, func(v float64) bool { return v >= 0 }, "present"},
		{"process_resident_memory_bytes", nil, func(v float64) bool { return v > 0 }, "present"},
	} {
		if got := metricValue(fams, c.name, c.labels...); !c.want(got) {
			t.Errorf("%s%v = %v, want %s", c.name, c.labels, got, c.what)
		}
	}
	ctl := getMetrics(t, "http://nbdcache/metrics", ctlSock)
	if got := metricValue(ctl, "nbdcache_nbd_bytes_written_total"); got != 3*mib+512 {
		t.Errorf("control socket /metrics: bytes written %v", got)
	}
	var names []string
	for n := range fams {
		if strings.HasPrefix(n, "nbdcache_") {
			names = append(names, n)
		}
	}
	t.Logf("%d nbdcache metrics", len(names))
}

// TestFailingBackingShows: a backing that fails every write shows in
// `stats` (writeback errors and the last message) and in the metrics.
func TestFailingBackingShows(t *testing.T) {
	f := startFaults(t, 64*mib, 16*mib, "--metrics", "127.0.0.1:0")
	defer f.stop()
	if out, code := nbdcache(t, "ctl", "--control", f.ctl, "error", "--target", "backing", "--op", "write", "--errno", "EIO"); code != 0 {
		t.Fatalf("ctl error: %d\n%s", code, out)
	}
	run(t, tool(t, "qemu-io"), "-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush", f.uri)
	if out, code := nbdcache(t, "flush", "--drain", "--control", f.ctl); code == 0 {
		t.Fatalf("a drain onto a failing backing succeeded:\n%s", out)
	}
	out, code := nbdcache(t, "stats", "--json", "--control", f.ctl)
	if code != 0 {
		t.Fatalf("stats: %d\n%s", code, out)
	}
	var st struct {
		Errors int64  `json:"writeback_errors"`
		Last   string `json:"writeback_last_error"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if st.Errors == 0 || !strings.Contains(st.Last, "input/output error") {
		t.Errorf("stats after failed writebacks: %+v", st)
	}
	m := regexp.MustCompile(`metrics on (http://\S+/metrics)`).FindStringSubmatch(f.stdout.String())
	if m == nil {
		t.Fatalf("no metrics address printed:\n%s", f.stdout)
	}
	if got := metricValue(getMetrics(t, m[1], ""), "nbdcache_writeback_errors_total"); got < float64(st.Errors) {
		t.Errorf("nbdcache_writeback_errors_total = %v, stats said %d", got, st.Errors)
	}
}
