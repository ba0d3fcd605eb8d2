//! Line charts for notebooks and run reports (activation and probability curves), drawn with
//! plotters: SVG for the notebook, a PNG fallback for frontends without SVG, a text summary.
//!
//! Text is rendered with DejaVu Sans embedded in the library (plotters' pure-Rust `ab_glyph`
//! backend), so charts look the same everywhere and need no system fonts or C libraries.
//!
//! ```
//! use diffexplainer::plot::LineChart;
//! let chart = LineChart::new("objective")
//!     .labels("iteration", "logit")
//!     .series("logit[3]", [(0.0, 1.0), (1.0, 2.5), (2.0, 3.0)])
//!     .marker(2.0, "best");
//! let svg = chart.to_svg().unwrap();
//! assert!(svg.starts_with("<svg"));
//! ```

use std::ops::Range;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::display::{encode_png, Display};

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("chart `{title}`: no finite points to plot")]
    NothingToPlot { title: String },
    #[error("chart `{title}`: size {width}x{height} is too small (at least 120x80)")]
    TooSmall {
        title: String,
        width: u32,
        height: u32,
    },
    #[error("chart `{title}`: drawing failed: {message}")]
    Draw { title: String, message: String },
}

/// One named curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: one or more series over a shared x axis, optional vertical markers.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Vertical lines (x, label), e.g. the best iteration.
    pub markers: Vec<(f64, String)>,
    pub width: u32,
    pub height: u32,
}

/// Series colours (colour-blind-friendly Okabe–Ito order).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];
const MARKER_COLOR: RGBColor = RGBColor(120, 120, 120);
const FONT: &str = "sans-serif";

impl LineChart {
    /// An empty 640x360 chart.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            x_label: String::new(),
            y_label: String::new(),
            series: Vec::new(),
            markers: Vec::new(),
            width: 640,
            height: 360,
        }
    }
    pub fn labels(mut self, x: impl Into<String>, y: impl Into<String>) -> Self {
        self.x_label = x.into();
        self.y_label = y.into();
        self
    }
    pub fn series(
        mut self,
        name: impl Into<String>,
        points: impl IntoIterator<Item = (f64, f64)>,
    ) -> Self {
        self.series.push(Series {
            name: name.into(),
            points: points.into_iter().collect(),
        });
        self
    }
    pub fn marker(mut self, x: f64, label: impl Into<String>) -> Self {
        self.markers.push((x, label.into()));
        self
    }
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.width = width;
        self.height = height;
        self
    }

    /// The chart as an SVG document.
    pub fn to_svg(&self) -> Result<String, PlotError> {
        let mut svg = String::new();
        {
            let root =
                SVGBackend::with_string(&mut svg, (self.width, self.height)).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(|e| self.draw_error(e))?;
        }
        Ok(svg)
    }

    /// The chart as PNG file bytes (same layout as the SVG).
    pub fn to_png(&self) -> Result<Vec<u8>, PlotError> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut rgb = vec![255u8; w * h * 3];
        {
            let root =
                BitMapBackend::with_buffer(&mut rgb, (self.width, self.height)).into_drawing_area();
            self.draw(&root)?;
            root.present().map_err(|e| self.draw_error(e))?;
        }
        encode_png(w, h, 3, &rgb).map_err(|e| self.draw_error(e))
    }

    /// SVG, PNG fallback and a text summary, ready for [`crate::display::show`].
    pub fn display(&self) -> Result<Display, PlotError> {
        Ok(Display::new()
            .svg(self.to_svg()?)
            .png(&self.to_png()?)
            .text(self.summary()))
    }

    /// One line per series: its last point and its range.
    pub fn summary(&self) -> String {
        let mut text = format!("<chart {}>", self.title);
        for s in &self.series {
            let finite: Vec<&(f64, f64)> = s.points.iter().filter(|p| is_finite(p)).collect();
            match finite.last() {
                Some((x, y)) => {
                    let (lo, hi) = finite
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                            (lo.min(p.1), hi.max(p.1))
                        });
                    text.push_str(&format!(
                        "\n  {}: {} point(s), last ({x}, {y:.4}), range [{lo:.4}, {hi:.4}]",
                        s.name,
                        finite.len()
                    ));
                }
                None => text.push_str(&format!("\n  {}: no finite points", s.name)),
            }
        }
        text
    }

    /// Called by evcxr when the chart is a cell's last expression.
    pub fn evcxr_display(&self) {
        match self.display() {
            Ok(d) => d.evcxr_display(),
            Err(e) => Display::new().text(format!("<{e}>")).evcxr_display(),
        }
    }

    fn draw_error(&self, e: impl std::fmt::Display) -> PlotError {
        PlotError::Draw {
            title: self.title.clone(),
            message: e.to_string(),
        }
    }

    /// Axis ranges over the finite points and markers, padded so flat or single-point curves
    /// still get a visible span.
    fn ranges(&self) -> Result<(Range<f64>, Range<f64>), PlotError> {
        let points = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| is_finite(p));
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for &(x, y) in points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if !x0.is_finite() {
            return Err(PlotError::NothingToPlot {
                title: self.title.clone(),
            });
        }
        for (x, _) in self.markers.iter().filter(|(x, _)| x.is_finite()) {
            (x0, x1) = (x0.min(*x), x1.max(*x));
        }
        let pad = |lo: f64, hi: f64, frac: f64| {
            let span = hi - lo;
            let margin = if span > 0.0 {
                span * frac
            } else {
                lo.abs().max(1.0) * 0.5
            };
            (lo - margin)..(hi + margin)
        };
        Ok((pad(x0, x1, 0.02), pad(y0, y1, 0.08)))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), PlotError> {
        if self.width < 120 || self.height < 80 {
            return Err(PlotError::TooSmall {
                title: self.title.clone(),
                width: self.width,
                height: self.height,
            });
        }
        register_font();
        let err = |e: DrawingAreaErrorKind<DB::ErrorType>| self.draw_error(e);
        let (x_range, y_range) = self.ranges()?;
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range, y_range.clone())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            // Grid lines at the labelled ticks only: light lines between them multiply the SVG's
            // size (it is resent with every live update) without helping to read the curve.
            .max_light_lines(0)
            .draw()
            .map_err(err)?;
        for (x, label) in self.markers.iter().filter(|(x, _)| x.is_finite()) {
            chart
                .draw_series(LineSeries::new(
                    [(*x, y_range.start), (*x, y_range.end)],
                    MARKER_COLOR.stroke_width(1),
                ))
                .map_err(err)?
                .label(format!("{label} ({x})"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], MARKER_COLOR));
        }
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // A non-finite value (a diverged iteration) breaks the line instead of hiding it.
            for run in s.points.split(|p| !is_finite(p)).filter(|r| !r.is_empty()) {
                let drawn = if run.len() == 1 {
                    chart
                        .draw_series([Circle::new(run[0], 3, color.filled())])
                        .map_err(err)?
                } else {
                    chart
                        .draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))
                        .map_err(err)?
                };
                if std::ptr::eq(run.as_ptr(), first_finite_run(&s.points)) {
                    drawn.label(&s.name).legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                }
            }
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

fn is_finite(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

/// Start of the first run of finite points (the one that carries the legend entry).
fn first_finite_run(points: &[(f64, f64)]) -> *const (f64, f64) {
    points
        .split(|p| !is_finite(p))
        .find(|r| !r.is_empty())
        .map_or(std::ptr::null(), |r| r.as_ptr())
}

/// Registers the embedded font with plotters once per process.
fn register_font() {
    static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font committed with the crate; a failure here is a
        // packaging bug, and plotters then reports "font unavailable" on the first text.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .expect("a valid PNG")
            .to_rgb8()
    }

    #[test]
    fn svg_has_title_labels_and_one_path_per_series() {
        let chart = LineChart::new("activation of neuron 7")
            .labels("iteration", "activation")
            .series("neuron 7", (0..10).map(|i| (i as f64, (i * i) as f64)))
            .series("p(class 3)", (0..10).map(|i| (i as f64, i as f64 / 10.0)));
        let svg = chart.to_svg().unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "activation of neuron 7",
            "iteration",
            "neuron 7",
            "p(class 3)",
        ] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        let blue = "#0072B2";
        let orange = "#D55E00";
        assert!(svg.contains(blue) && svg.contains(orange), "series colours");
    }

    #[test]
    fn png_has_the_size_and_draws_the_series_colour() {
        let chart = LineChart::new("t")
            .size(320, 200)
            .series("s", [(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)]);
        let img = decode(&chart.to_png().unwrap());
        assert_eq!(img.dimensions(), (320, 200));
        let blue = img.pixels().filter(|p| p.0 == [0, 114, 178]).count();
        assert!(blue > 100, "only {blue} pixels of the series colour");
        // Text is really rasterized (dark anti-aliased glyph pixels), not silently dropped.
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 60)).count();
        assert!(dark > 50, "only {dark} dark (text/axis) pixels");
    }

    #[test]
    fn non_finite_points_break_the_line_and_empty_charts_are_errors() {
        let chart = LineChart::new("diverged").series(
            "loss",
            [(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5), (3.0, 0.4)],
        );
        assert!(chart.to_svg().is_ok());
        assert!(chart.summary().contains("3 point(s)"));
        let empty = LineChart::new("nothing").series("loss", [(0.0, f64::NAN)]);
        let err = empty.to_svg().unwrap_err().to_string();
        assert!(
            err.contains("nothing") && err.contains("no finite points"),
            "{err}"
        );
        let tiny = LineChart::new("small")
            .size(10, 10)
            .series("a", [(0.0, 1.0)]);
        assert!(tiny.to_png().unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn flat_and_single_point_curves_get_a_visible_range() {
        let chart = LineChart::new("flat")
            .series("c", [(0.0, 2.0)])
            .marker(0.0, "best");
        let (x, y) = chart.ranges().unwrap();
        assert!(x.end > x.start && y.end > y.start);
        assert!(y.contains(&2.0));
        chart.to_png().unwrap();
    }

    /// Writes an example chart for looking at: `DIFFEXPLAINER_PLOT_EXAMPLE=out.png cargo test ...`.
    #[test]
    fn example_chart_for_inspection() {
        let chart = LineChart::new("objective per iteration")
            .labels("iteration", "logit[207]")
            .series(
                "objective",
                (0..40).map(|i| {
                    (
                        i as f64,
                        (i as f64 / 6.0).tanh() * 8.0 + (i % 3) as f64 * 0.2,
                    )
                }),
            )
            .series(
                "p(target)",
                (0..40).map(|i| (i as f64, (i as f64 / 10.0).tanh())),
            )
            .marker(37.0, "best");
        let png = chart.to_png().unwrap();
        if let Some(path) = std::env::var_os("DIFFEXPLAINER_PLOT_EXAMPLE") {
            std::fs::write(path, &png).unwrap();
        }
        assert!(
            chart.to_svg().unwrap().len() < 20_000,
            "SVG stays small enough to resend live"
        );
    }

    #[test]
    fn display_carries_svg_png_and_text() {
        let d = LineChart::new("c")
            .series("a", [(0.0, 1.0), (1.0, 2.0)])
            .display()
            .unwrap();
        assert!(d.get("image/svg+xml").unwrap().starts_with("<svg"));
        assert!(d.get("image/png").is_some());
        assert!(d.get("text/plain").unwrap().contains("2 point(s)"));
    }
}
