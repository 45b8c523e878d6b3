package metrics

import (
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/writeback"
)

// numbered returns v with every exported int and float field set to a
// distinct value (its index + 1, times 1000) and every bool to true.
func numbered[T any]() T {
	var v T
	rv := reflect.ValueOf(&v).Elem()
	for i := range rv.NumField() {
		f := rv.Field(i)
		if !rv.Type().Field(i).IsExported() || f.Type().PkgPath() != "" {
			continue
		}
		switch f.Kind() {
		case reflect.Int, reflect.Int64, reflect.Int32:
			f.SetInt(int64(i+1) * 1000)
		case reflect.Float64:
			f.SetFloat(float64(i+1) + 0.5)
		case reflect.Bool:
			f.SetBool(true)
		}
	}
	return v
}

// scrape fetches /metrics from m and parses it with Prometheus' own
// exposition-format parser.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics: %d %s", rec.Code, rec.Body)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(rec.Body.String()))
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, rec.Body)
	}
	return fams
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return -1
}

// TestEveryStatIsAMetric: each number and flag of cache.Stats, nbd.Stats
// and writeback.Stats appears, under its rule-following name, with the
// value the source gave (so a new stat is exported, and none is mixed up
// with another).
func TestEveryStatIsAMetric(t *testing.T) {
	ns, cs, ws, bs := numbered[nbd.Stats](), numbered[cache.Stats](), numbered[writeback.Stats](), numbered[nbd.RemoteStats]()
	cs.Mode = cache.Writearound
	m := New(Sources{
		Server:    func() nbd.Stats { return ns },
		Cache:     func() (cache.Stats, bool) { return cs, true },
		Writeback: func() (writeback.Stats, bool) { return ws, true },
		Backing:   func() (nbd.RemoteStats, bool) { return bs, true },
	})
	fams := scrape(t, m)
	check := func(source string, v any) {
		rv := reflect.ValueOf(v)
		n := 0
		for i := range rv.NumField() {
			f := rv.Type().Field(i)
			fv := rv.Field(i)
			if !f.IsExported() || fv.Type().PkgPath() != "" {
				continue
			}
			var want float64
			switch fv.Kind() {
			case reflect.Int, reflect.Int64, reflect.Int32:
				want = float64(fv.Int())
			case reflect.Float64:
				want = fv.Float()
			case reflect.Bool:
				want = 1
			default:
				continue
			}
			n++
			name, typ := metricName(source, f.Name, fv.Kind())
			fam := fams[name]
			if fam == nil {
				t.Errorf("%s.%s: no metric %s", source, f.Name, name)
				continue
			}
			if (typ == prometheus.CounterValue) != (fam.GetType() == dto.MetricType_COUNTER) {
				t.Errorf("%s: type %v", name, fam.GetType())
			}
			if fam.GetType() == dto.MetricType_COUNTER && !strings.HasSuffix(name, "_total") {
				t.Errorf("%s: a counter whose name does not end in _total", name)
			}
			if got := value(fam.Metric[0]); got != want {
				t.Errorf("%s = %v, want %v", name, got, want)
			}
		}
		if n < 4 {
			t.Errorf("%s: only %d fields seen", source, n)
		}
	}
	check("nbd", ns)
	check("cache", cs)
	check("writeback", ws)
	check("backing", bs)
	if got := fams["nbdcache_cache_dirty_bytes"]; got == nil || got.GetType() != dto.MetricType_GAUGE {
		t.Errorf("dirty bytes is not a gauge: %v", got)
	}
	modes := map[string]float64{}
	for _, mm := range fams["nbdcache_cache_mode"].GetMetric() {
		modes[mm.Label[0].GetValue()] = value(mm)
	}
	if modes["writearound"] != 1 || modes["writeback"] != 0 || len(modes) != 4 {
		t.Errorf("mode gauge: %v", modes)
	}
}

// TestNoCacheNoCacheMetrics: a server without a cache exports its server
// metrics only.
func TestNoCacheNoCacheMetrics(t *testing.T) {
	m := New(Sources{
		Server:    func() nbd.Stats { return nbd.Stats{Requests: 3} },
		Cache:     func() (cache.Stats, bool) { return cache.Stats{}, false },
		Writeback: func() (writeback.Stats, bool) { return writeback.Stats{}, false },
	})
	fams := scrape(t, m)
	for name := range fams {
		if strings.HasPrefix(name, "nbdcache_cache_") || strings.HasPrefix(name, "nbdcache_writeback_") {
			t.Errorf("metric %s without a cache", name)
		}
	}
	if got := value(fams["nbdcache_nbd_requests_total"].Metric[0]); got != 3 {
		t.Errorf("requests %v", got)
	}
}

// TestRequestObserver: latencies land in the command's histogram, errors
// in the command's and errno's counter.
func TestRequestObserver(t *testing.T) {
	m := New(Sources{})
	o := m.Observer()
	o.Request("WRITE", 50*time.Microsecond, "")
	o.Request("WRITE", 3*time.Millisecond, "")
	o.Request("READ", time.Millisecond, "EIO")
	fams := scrape(t, m)
	counts := map[string]uint64{}
	for _, mm := range fams["nbdcache_nbd_request_duration_seconds"].GetMetric() {
		counts[mm.Label[0].GetValue()] = mm.Histogram.GetSampleCount()
	}
	if counts["WRITE"] != 2 || counts["READ"] != 1 {
		t.Errorf("histogram counts %v", counts)
	}
	errs := fams["nbdcache_nbd_request_errors_total"].GetMetric()
	if len(errs) != 1 || value(errs[0]) != 1 {
		t.Fatalf("errors %v", errs)
	}
	labels := map[string]string{}
	for _, l := range errs[0].Label {
		labels[l.GetName()] = l.GetValue()
	}
	if labels["command"] != "READ" || labels["errno"] != "EIO" {
		t.Errorf("error labels %v", labels)
	}
}

func TestSnake(t *testing.T) {
	for in, want := range map[string]string{
		"GCMovedBytes": "gc_moved_bytes", "FUA": "fua", "RAMHits": "ram_hits", "BytesRead": "bytes_read",
		"Active": "active", "JournalUsedBlocks": "journal_used_blocks", "RMW": "rmw", "AvgWrite": "avg_write",
	} {
		if got := snake(in); got != want {
			t.Errorf("snake(%q) = %q, want %q", in, got, want)
		}
	}
}

// BenchmarkObserve is what the metrics add to each request: one
// histogram observation (the two clock reads around it are the rest).
func BenchmarkObserve(b *testing.B) {
	o := New(Sources{}).Observer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			start := time.Now()
			o.Request("WRITE", time.Since(start), "")
		}
	})
}
