//! `report.svg`: a run's metrics.jsonl drawn against the optimizer step, four panels (loss with
//! eval loss when logged, learning rate, gradient norm, tokens/s), redrawn from the whole history
//! at every checkpoint so that a resumed run's report covers every step.
//!
//! Drawn with plotters' SVG backend and its naive font metrics (no font files are read: the
//! viewer lays the text out), so the layout below is fixed in pixels and the tests can compute
//! where a value must land. Font sizes are plotters' (it writes `size / 1.24` into the SVG).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::metrics::StepMetrics;
use crate::error::{Error, Result};

pub(crate) const WIDTH: u32 = 1200;
pub(crate) const HEIGHT: u32 = 840;
/// The run's title and one line of totals above the panels.
pub(crate) const HEADER: u32 = 60;
/// Inside each panel: room for its caption above the plot, then the axis label areas.
pub(crate) const MARGIN_TOP: u32 = 30;
pub(crate) const MARGIN_BOTTOM: u32 = 10;
pub(crate) const MARGIN_LEFT: u32 = 10;
pub(crate) const MARGIN_RIGHT: u32 = 25;
pub(crate) const X_LABELS: u32 = 45;
pub(crate) const Y_LABELS: u32 = 80;
/// Head room above and below the data, as a fraction of its span, so that no line runs along
/// the frame.
pub(crate) const PAD: f64 = 0.05;

/// matplotlib's first colours: blue, orange, green, red, purple.
pub(crate) const TRAIN: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub(crate) const EVAL: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
pub(crate) const LR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
pub(crate) const GRAD_NORM: RGBColor = RGBColor(0xd6, 0x27, 0x28);
pub(crate) const TOKENS: RGBColor = RGBColor(0x94, 0x67, 0xbd);

/// Draws the report and writes it atomically to `path`.
pub fn write(path: &Path, metrics: &[StepMetrics], title: &str) -> Result<()> {
    crate::fsutil::write_atomically(path, render(metrics, title)?.as_bytes())
}

/// The report as a standalone SVG document.
pub fn render(metrics: &[StepMetrics], title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, metrics, title).and_then(|_| root.present()).map_err(|e| Error::Report(e.to_string()))?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// One panel: its caption, y-axis description, the series drawn in it and their value range.
struct Panel<'a> {
    caption: &'a str,
    y_desc: &'a str,
    series: Vec<Series>,
    /// Whether the y range starts at zero (rates and norms) or hugs the data (loss).
    from_zero: bool,
    format: fn(f64, f64) -> String,
}

struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(usize, f64)>,
    /// Drawn with a marker at each point as well: eval loss is logged only every few steps.
    markers: bool,
}

impl Series {
    fn new(name: &'static str, color: RGBColor, metrics: &[StepMetrics], value: impl Fn(&StepMetrics) -> Option<f64>) -> Self {
        // A non-finite value (a gradient norm that overflowed) has no place on a linear axis.
        let points = metrics.iter().filter_map(|m| value(m).filter(|v| v.is_finite()).map(|v| (m.step, v))).collect();
        Series { name, color, points, markers: false }
    }
}

fn draw(root: &Area, metrics: &[StepMetrics], title: &str) -> DrawResult {
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER);
    header.draw(&Text::new(title, (MARGIN_LEFT as i32, 10), ("sans-serif", 28).into_font().color(&BLACK)))?;
    header.draw(&Text::new(totals(metrics), (MARGIN_LEFT as i32, 36), ("sans-serif", 18).into_font().color(&BLACK.mix(0.7))))?;

    let mut eval = Series::new("eval loss", EVAL, metrics, |m| m.eval_loss);
    eval.markers = true;
    let mut loss = vec![Series::new("train loss", TRAIN, metrics, |m| Some(m.loss as f64))];
    if !eval.points.is_empty() {
        loss.push(eval);
    }
    let panels = [
        Panel { caption: "Loss", y_desc: "loss (nats / token)", series: loss, from_zero: false, format: fixed },
        Panel {
            caption: "Learning rate",
            y_desc: "learning rate",
            series: vec![Series::new("learning rate", LR, metrics, |m| Some(m.lr))],
            from_zero: true,
            format: scientific,
        },
        Panel {
            caption: "Gradient norm (before clipping)",
            y_desc: "global L2 norm",
            series: vec![Series::new("gradient norm", GRAD_NORM, metrics, |m| Some(m.grad_norm))],
            from_zero: true,
            format: fixed,
        },
        Panel {
            caption: "Throughput",
            y_desc: "tokens / s",
            series: vec![Series::new("tokens/s", TOKENS, metrics, |m| Some(m.tokens_per_s))],
            from_zero: true,
            format: fixed,
        },
    ];
    let last_step = metrics.iter().map(|m| m.step).max().unwrap_or(0).max(1);
    for (area, panel) in body.split_evenly((2, 2)).iter().zip(&panels) {
        draw_panel(area, panel, last_step)?;
    }
    Ok(())
}

fn draw_panel(area: &Area, panel: &Panel, last_step: usize) -> DrawResult {
    area.draw(&Text::new(panel.caption, ((MARGIN_LEFT + Y_LABELS) as i32, 8), ("sans-serif", 21).into_font().color(&BLACK)))?;
    let (lo, hi) = y_range(panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), panel.from_zero);
    let mut chart = ChartBuilder::on(area)
        .margin_top(MARGIN_TOP)
        .margin_bottom(MARGIN_BOTTOM)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .x_label_area_size(X_LABELS)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0..last_step, lo..hi)?;
    let format = panel.format;
    let span = hi - lo;
    let y_label = |v: &f64| format(*v, span);
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(panel.y_desc)
        .x_labels(8)
        .y_labels(6)
        .y_label_formatter(&y_label)
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for s in &panel.series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.filled()));
        if s.markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 17))
            .draw()?;
    }
    Ok(())
}

/// The y range drawn for `values`: their span padded by [`PAD`] on each side, or from zero to
/// the maximum padded above; a flat or empty series still gets a range of non-zero height.
pub(crate) fn y_range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        let lo = lo.min(0.0);
        let hi = hi.max(0.0);
        return if hi > lo { (lo, hi + PAD * (hi - lo)) } else { (0.0, 1.0) };
    }
    if hi > lo {
        (lo - PAD * (hi - lo), hi + PAD * (hi - lo))
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Enough decimals that six labels across `span` differ.
fn fixed(v: f64, span: f64) -> String {
    let decimals = (-(span / 6.0).log10()).ceil().clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

fn scientific(v: f64, _span: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.2e}")
    }
}

/// One line under the title: steps, epochs, last losses, tokens and time.
fn totals(metrics: &[StepMetrics]) -> String {
    let Some(last) = metrics.last() else { return "no steps logged yet".into() };
    let tokens: usize = metrics.iter().map(|m| m.tokens).sum();
    let mut line = format!("{} steps, {:.2} epochs, train loss {:.4} (first {:.4})", last.step, last.epoch, last.loss, metrics[0].loss);
    if let Some((step, eval)) = metrics.iter().rev().find_map(|m| m.eval_loss.map(|e| (m.step, e))) {
        line += &format!(", eval loss {eval:.4} at step {step}");
    }
    line += &format!(", {tokens} tokens in {:.1} s", last.elapsed_s);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize, loss: f32, eval_loss: Option<f64>) -> StepMetrics {
        StepMetrics {
            step,
            epoch: step as f64 / 4.0,
            loss,
            eval_loss,
            lr: 1e-3 * (step as f64 / 10.0).min(1.0),
            grad_norm: 0.5 + step as f64 / 10.0,
            tokens: 100,
            tokens_per_s: 1000.0 + step as f64,
            elapsed_s: step as f64 * 0.1,
        }
    }

    /// The points of every polyline drawn in `color`, parsed from the document as XML.
    fn polylines(svg: &str, color: RGBColor) -> Vec<Vec<(i32, i32)>> {
        let doc = roxmltree::Document::parse(svg).expect("the report is well-formed XML");
        let stroke = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke.as_str()))
            .map(|n| {
                n.attribute("points")
                    .unwrap()
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// Pixel bounds of panel `index` (0 loss, 1 lr, 2 grad norm, 3 tokens/s; row-major) as the
    /// layout constants put them: (left, right, top, bottom) of the plotting area, where x = 0
    /// and the y range's low end land on (left, bottom).
    fn plot_area(index: u32) -> (f64, f64, f64, f64) {
        let (pw, ph) = (WIDTH / 2, (HEIGHT - HEADER) / 2);
        let (x0, y0) = ((index % 2) * pw, HEADER + (index / 2) * ph);
        let left = x0 + MARGIN_LEFT + Y_LABELS;
        let right = x0 + pw - MARGIN_RIGHT - 1;
        let top = y0 + MARGIN_TOP;
        let bottom = y0 + ph - MARGIN_BOTTOM - X_LABELS - 1;
        (left as f64, right as f64, top as f64, bottom as f64)
    }

    fn close(got: (i32, i32), want: (f64, f64), what: &str) {
        // plotters rounds to whole pixels.
        assert!(
            (got.0 as f64 - want.0).abs() <= 1.0 && (got.1 as f64 - want.1).abs() <= 1.0,
            "{what}: drawn at {got:?}, expected {want:?}"
        );
    }

    #[test]
    fn series_land_where_the_layout_puts_their_values() {
        // Train loss falls 3.0 -> 1.2 over 10 steps; eval loss at steps 5 and 10 reaches below
        // it (1.0), so the loss axis spans [1.0, 3.0] padded by 5%: [0.9, 3.1].
        let m: Vec<_> =
            (1..=10).map(|s| step(s, 3.0 - 0.2 * (s - 1) as f32, [(5, 2.0), (10, 1.0)].iter().find(|e| e.0 == s).map(|e| e.1))).collect();
        let svg = render(&m, "run & <test>").unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().attribute("width"), Some("1200"));
        assert!(svg.contains("run &amp; &lt;test&gt;"), "the title is escaped");

        let (left, right, top, bottom) = plot_area(0);
        let x = |s: f64| left + (right - left) * s / 10.0;
        let y = |v: f64| bottom - (bottom - top) * (v - 0.9) / (3.1 - 0.9);
        let train = polylines(&svg, TRAIN);
        assert_eq!(train.len(), 1, "one train-loss line");
        let train = &train[0];
        assert_eq!(train.len(), 10);
        close(train[0], (x(1.0), y(3.0)), "step 1, loss 3.0");
        close(train[9], (x(10.0), y(1.2)), "step 10, loss 1.2");
        assert!(train.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1), "falling loss goes down the page: {train:?}");

        let eval = polylines(&svg, EVAL);
        assert_eq!(eval.len(), 1, "one eval-loss line");
        assert_eq!(eval[0].len(), 2);
        close(eval[0][0], (x(5.0), y(2.0)), "eval at step 5");
        close(eval[0][1], (x(10.0), y(1.0)), "eval at step 10, the axis minimum");
        assert_eq!(svg.matches("<circle").count(), 2, "one marker per eval point");
        let texts: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(str::trim).collect();
        assert!(texts.contains(&"train loss") && texts.contains(&"eval loss"), "the legend names both: {texts:?}");

        // Learning rate: 1e-4 at step 1 up to 1e-3 from step 10, on [0, 1.05e-3].
        let (left, right, top, bottom) = plot_area(1);
        let lr = polylines(&svg, LR);
        assert_eq!(lr.len(), 1);
        assert_eq!(lr[0].len(), 10);
        close(lr[0][0], (left + (right - left) / 10.0, bottom - (bottom - top) * 1e-4 / 1.05e-3), "lr at step 1");
        close(lr[0][9], (right, bottom - (bottom - top) / 1.05), "lr at step 10");

        // Gradient norm 0.6 .. 1.5 and tokens/s 1001 .. 1010, both from zero.
        let (_, right, top, bottom) = plot_area(2);
        let grad = polylines(&svg, GRAD_NORM);
        assert_eq!(grad[0].len(), 10);
        close(grad[0][9], (right, bottom - (bottom - top) / 1.05), "grad norm maximum");
        close(grad[0][0], (grad[0][0].0 as f64, bottom - (bottom - top) * 0.6 / (1.5 * 1.05)), "grad norm at step 1");
        let (_, right, top, bottom) = plot_area(3);
        let tokens = polylines(&svg, TOKENS);
        assert_eq!(tokens[0].len(), 10);
        close(tokens[0][9], (right, bottom - (bottom - top) / 1.05), "tokens/s maximum");
        close(tokens[0][0], (tokens[0][0].0 as f64, bottom - (bottom - top) * 1001.0 / (1010.0 * 1.05)), "tokens/s at step 1");
    }

    #[test]
    fn without_eval_loss_the_loss_panel_has_one_series_and_no_legend() {
        let m: Vec<_> = (1..=5).map(|s| step(s, 2.0 - 0.1 * s as f32, None)).collect();
        let svg = render(&m, "t").unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(polylines(&svg, TRAIN).len(), 1);
        assert!(polylines(&svg, EVAL).is_empty());
        assert!(!svg.contains("eval loss") && !svg.contains("<circle"));
    }

    #[test]
    fn a_history_with_a_gap_is_drawn_at_its_steps() {
        // Steps 1-3 and 8-10 (a metrics file from before a resume, less what was dropped): the
        // x positions follow the step numbers, not the line numbers.
        let m: Vec<_> = [1, 2, 3, 8, 9, 10].iter().map(|&s| step(s, 1.0 + s as f32 / 10.0, None)).collect();
        let svg = render(&m, "t").unwrap();
        let (left, right, _, _) = plot_area(0);
        let xs: Vec<i32> = polylines(&svg, TRAIN)[0].iter().map(|p| p.0).collect();
        assert_eq!(xs.len(), 6);
        for (x, s) in xs.iter().zip([1, 2, 3, 8, 9, 10]) {
            assert!((*x as f64 - (left + (right - left) * s as f64 / 10.0)).abs() <= 1.0, "step {s} at x {x}");
        }
    }

    #[test]
    fn empty_and_flat_histories_still_draw() {
        let svg = render(&[], "nothing yet").unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert!(svg.contains("no steps logged yet"));
        assert!(polylines(&svg, TRAIN).is_empty());

        // One step: a flat loss gets a range of height 1 around it, drawn mid-panel.
        let svg = render(&[step(1, 2.0, None)], "one").unwrap();
        let (left, right, top, bottom) = plot_area(0);
        close(polylines(&svg, TRAIN)[0][0], (right, (top + bottom) / 2.0), "the only step");
        assert!(left < right);
        assert_eq!(y_range([2.0].into_iter(), false), (1.5, 2.5));
        assert_eq!(y_range([0.0, 0.0].into_iter(), true), (0.0, 1.0));
        assert_eq!(y_range([f64::INFINITY].into_iter().filter(|v| v.is_finite()), true), (0.0, 1.0));
    }

    #[test]
    fn non_finite_values_are_left_out() {
        let mut m: Vec<_> = (1..=4).map(|s| step(s, 1.0, None)).collect();
        m[2].grad_norm = f64::INFINITY;
        let svg = render(&m, "t").unwrap();
        assert_eq!(polylines(&svg, GRAD_NORM)[0].len(), 3);
        assert_eq!(polylines(&svg, TRAIN)[0].len(), 4);
    }

    #[test]
    fn label_decimals_follow_the_span() {
        assert_eq!(fixed(1.23456, 0.12), "1.23");
        assert_eq!(fixed(1234.4, 1200.0), "1234");
        assert_eq!(fixed(2.5, 3.0), "2.5");
        assert_eq!(scientific(2e-4, 1e-3), "2.00e-4");
    }
}
