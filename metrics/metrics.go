package metrics

// metrics.go: Metrics: the statistics collector over Sources and the
// per-request observer.

import (
	"net/http"
	"reflect"
	"strings"
	"time"
	"unicode"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/writeback"
)

const namespace = "nbdcache"

// Sources are the live statistics the collector reads at each scrape.
// Cache and Writeback report false when the server runs without a cache
// (or the cache without a flusher): their metrics are then absent.
type Sources struct {
	Server    func() nbd.Stats
	Cache     func() (cache.Stats, bool)
	Writeback func() (writeback.Stats, bool)
	// Backing reports false when the backing is not an NBD export.
	Backing func() (nbd.RemoteStats, bool)
}

// gauges lists, per source, the fields that are levels (they go down as
// well as up); every other integer field is a counter.
var gauges = map[string]map[string]bool{
	"nbd": {"Active": true, "BufferBytes": true, "BufferPeak": true},
	"cache": {"DirtyBytes": true, "CachedBytes": true, "Extents": true, "CapacityBytes": true,
		"FreeBuckets": true, "PendingBuckets": true, "Buckets": true, "JournalUsedBlocks": true,
		"JournalSlots": true, "WritebackInFlight": true, "ReplayedRecords": true, "ReplayDropped": true},
	"backing":   {"DownSeconds": true},
	"writeback": {"Rate": true, "Target": true, "Dirty": true, "Pending": true, "WrittenRate": true, "AvgWrite": true},
}

// Metrics is a registry holding the statistics collector, the request
// observer (pass it as nbd.Config.Observer) and Go's runtime and process
// collectors.
type Metrics struct {
	reg      *prometheus.Registry
	latency  *prometheus.HistogramVec
	errors   *prometheus.CounterVec
	observer observer
}

// New returns the metrics of a server whose statistics src reads.
func New(src Sources) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "nbd", Name: "request_duration_seconds",
		Help:    "Time from a request's dispatch to its reply, by command.",
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10), // 10 µs .. 2.6 s
	}, []string{"command"})
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "nbd", Name: "request_errors_total",
		Help: "Requests answered with an error, by command and NBD errno.",
	}, []string{"command", "errno"})
	m.observer = observer{m: m, byCmd: map[string]prometheus.Observer{}}
	for _, c := range []string{"READ", "WRITE", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"} {
		m.observer.byCmd[c] = m.latency.WithLabelValues(c)
	}
	m.reg.MustRegister(m.latency, m.errors, statsCollector{src},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Observer returns the nbd.Observer that feeds the per-request metrics.
func (m *Metrics) Observer() nbd.Observer { return m.observer }

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// observer feeds the per-request metrics. byCmd holds the histogram of
// each known command, looked up once (read-only after New): the label
// hashing of WithLabelValues was most of an observation's cost.
type observer struct {
	m     *Metrics
	byCmd map[string]prometheus.Observer
}

func (o observer) Request(command string, took time.Duration, errno string) {
	h, ok := o.byCmd[command]
	if !ok {
		h = o.m.latency.WithLabelValues(command)
	}
	h.Observe(took.Seconds())
	if errno != "" {
		o.m.errors.WithLabelValues(command, errno).Inc()
	}
}

// statsCollector turns the sources' stats structs into metrics at each
// scrape. It is unchecked (Describe sends nothing): which metrics exist
// depends on whether there is a cache.
type statsCollector struct{ src Sources }

func (statsCollector) Describe(chan<- *prometheus.Desc) {}

func (s statsCollector) Collect(ch chan<- prometheus.Metric) {
	if s.src.Server != nil {
		emit(ch, "nbd", s.src.Server())
	}
	if s.src.Cache != nil {
		if st, ok := s.src.Cache(); ok {
			emit(ch, "cache", st)
			mode := prometheus.NewDesc(prometheus.BuildFQName(namespace, "cache", "mode"),
				"The cache mode: 1 for the current one.", []string{"mode"}, nil)
			for m := cache.Writeback; m <= cache.None; m++ {
				ch <- prometheus.MustNewConstMetric(mode, prometheus.GaugeValue, boolValue(st.Mode == m), m.String())
			}
		}
	}
	if s.src.Writeback != nil {
		if st, ok := s.src.Writeback(); ok {
			emit(ch, "writeback", st)
		}
	}
	if s.src.Backing != nil {
		if st, ok := s.src.Backing(); ok {
			emit(ch, "backing", st)
		}
	}
}

// emit sends one metric per integer, float or boolean field of the
// struct v (see the package documentation for the names).
func emit(ch chan<- prometheus.Metric, source string, v any) {
	rv := reflect.ValueOf(v)
	rt := rv.Type()
	for i := range rt.NumField() {
		f := rt.Field(i)
		if !f.IsExported() {
			continue
		}
		fv := rv.Field(i)
		if fv.Type().PkgPath() != "" {
			continue // a named type (a mode, an error): not a number
		}
		var val float64
		switch fv.Kind() {
		case reflect.Int, reflect.Int64, reflect.Int32:
			val = float64(fv.Int())
		case reflect.Float64:
			val = fv.Float()
		case reflect.Bool:
			val = boolValue(fv.Bool())
		default:
			continue
		}
		name, typ := metricName(source, f.Name, fv.Kind())
		desc := prometheus.NewDesc(name, source+" "+f.Name+" (see "+rt.String()+").", nil, nil)
		ch <- prometheus.MustNewConstMetric(desc, typ, val)
	}
}

// metricName is the metric of field of source, and its type.
func metricName(source, field string, kind reflect.Kind) (string, prometheus.ValueType) {
	base := prometheus.BuildFQName(namespace, source, snake(field))
	if kind != reflect.Bool && kind != reflect.Float64 && !gauges[source][field] {
		return base + "_total", prometheus.CounterValue
	}
	return base, prometheus.GaugeValue
}

// snake turns a Go field name into snake case: "GCMovedBytes" is
// "gc_moved_bytes", "FUA" is "fua".
func snake(s string) string {
	r := []rune(s)
	var b strings.Builder
	for i, c := range r {
		if unicode.IsUpper(c) && i > 0 {
			prevLower := unicode.IsLower(r[i-1]) || unicode.IsDigit(r[i-1])
			nextLower := i+1 < len(r) && unicode.IsLower(r[i+1])
			if prevLower || unicode.IsUpper(r[i-1]) && nextLower {
				b.WriteByte('_')
			}
		}
		b.WriteRune(unicode.ToLower(c))
	}
	return b.String()
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
