// Command plot draws the benchmarks' PNGs.
//
// The writeback experiment's time series: client write IOPS, dirty data
// and writeback rate over time, one panel each, sharing the time axis.
//
//	go run ./bench/plot -in series.csv -out writeback.png
//
// The CSV has a header line and the columns t_seconds, iops, dirty_mib,
// writeback_mib_s.
//
// With -sweep, bench/pressure.sh's sweep: IOPS against the ratio of
// working set to cache (log scale), a panel per backing, a line each with
// and without the cache. The CSV has a header line and the columns
// backing, ratio, alone_iops, cached_iops (more are ignored).
package main

// main.go: the plot command: the writeback time series and the pressure
// sweep, drawn as PNGs.

import (
	"encoding/csv"
	"flag"
	"fmt"
	"image/color"
	"os"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

func main() {
	in := flag.String("in", "", "CSV file (t_seconds, iops, dirty_mib, writeback_mib_s)")
	out := flag.String("out", "writeback.png", "PNG to write")
	title := flag.String("title", "nbdcache write-back over an HDD model: fio 4k randwrite QD32", "title")
	sweep := flag.Bool("sweep", false, "draw bench/pressure.sh's sweep instead")
	flag.Parse()
	render := run
	if *sweep {
		render = runSweep
	}
	if err := render(*in, *out, *title); err != nil {
		fmt.Fprintln(os.Stderr, "plot:", err)
		os.Exit(1)
	}
}

func run(in, out, title string) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return err
	}
	if len(rows) < 2 {
		return fmt.Errorf("%s: no data rows", in)
	}
	cols := len(rows[0])
	if cols < 4 {
		return fmt.Errorf("%s: want 4 columns, have %d", in, cols)
	}
	series := make([]plotter.XYs, 3)
	for _, r := range rows[1:] {
		var v [4]float64
		for i := range v {
			if v[i], err = strconv.ParseFloat(r[i], 64); err != nil {
				return fmt.Errorf("%s: %q: %v", in, r[i], err)
			}
		}
		for i := range series {
			series[i] = append(series[i], plotter.XY{X: v[0], Y: v[i+1]})
		}
	}
	labels := []string{"client write IOPS", "dirty (MiB)", "writeback (MiB/s)"}
	colors := []color.Color{color.RGBA{0x1f, 0x77, 0xb4, 0xff}, color.RGBA{0xd6, 0x27, 0x28, 0xff}, color.RGBA{0x2c, 0xa0, 0x2c, 0xff}}
	plots := make([][]*plot.Plot, 3)
	for i := range series {
		p := plot.New()
		if i == 0 {
			p.Title.Text = title
		}
		p.Y.Label.Text = labels[i]
		if i == 2 {
			p.X.Label.Text = "time (s)"
		}
		p.Add(plotter.NewGrid())
		l, err := plotter.NewLine(series[i])
		if err != nil {
			return err
		}
		l.Color = colors[i]
		l.Width = vg.Points(1.5)
		p.Add(l)
		plots[i] = []*plot.Plot{p}
	}
	return writePNG(out, plots, vg.Points(640), vg.Points(8))
}

// writePNG draws plots one above the other, 720 points wide and height
// tall in all, padY apart, and writes them to out as a PNG.
func writePNG(out string, plots [][]*plot.Plot, height, padY vg.Length) error {
	img := vgimg.New(vg.Points(720), height)
	tiles := draw.Tiles{Rows: len(plots), Cols: 1, PadTop: vg.Points(6), PadBottom: vg.Points(6), PadLeft: vg.Points(6), PadRight: vg.Points(12), PadY: padY}
	canvases := plot.Align(plots, tiles, draw.New(img))
	for i := range plots {
		plots[i][0].Draw(canvases[i][0])
	}
	w, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(w); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}

func runSweep(in, out, title string) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return err
	}
	if len(rows) < 2 || len(rows[0]) < 4 {
		return fmt.Errorf("%s: want a header and rows of backing, ratio, alone_iops, cached_iops", in)
	}
	type lines struct{ alone, cached plotter.XYs }
	var order []string
	byBacking := map[string]*lines{}
	for _, r := range rows[1:] {
		var v [3]float64
		for i := range v {
			if v[i], err = strconv.ParseFloat(r[i+1], 64); err != nil {
				return fmt.Errorf("%s: %q: %v", in, r[i+1], err)
			}
		}
		l := byBacking[r[0]]
		if l == nil {
			l = &lines{}
			byBacking[r[0]] = l
			order = append(order, r[0])
		}
		l.alone = append(l.alone, plotter.XY{X: v[0], Y: v[1]})
		l.cached = append(l.cached, plotter.XY{X: v[0], Y: v[2]})
	}
	plots := make([][]*plot.Plot, len(order))
	for i, b := range order {
		p := plot.New()
		p.Title.Text = title + " (" + b + " backing)"
		p.X.Label.Text = "working set / cache"
		p.Y.Label.Text = "IOPS"
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		p.Add(plotter.NewGrid())
		for j, s := range []struct {
			name string
			xy   plotter.XYs
			c    color.Color
		}{
			{"backing alone", byBacking[b].alone, color.RGBA{0x7f, 0x7f, 0x7f, 0xff}},
			{"with the cache", byBacking[b].cached, color.RGBA{0x1f, 0x77, 0xb4, 0xff}},
		} {
			l, pts, err := plotter.NewLinePoints(s.xy)
			if err != nil {
				return err
			}
			l.Color, pts.Color = s.c, s.c
			l.Width = vg.Points(1.5)
			if j == 0 {
				l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
			}
			p.Add(l, pts)
			p.Legend.Add(s.name, l, pts)
		}
		p.Legend.Top = true
		plots[i] = []*plot.Plot{p}
	}
	return writePNG(out, plots, vg.Points(300*float64(len(order))), vg.Points(12))
}
