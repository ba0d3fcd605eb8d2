//! Notebook views of an optimization: a live output updated in place while the loop runs
//! (iteration, loss, target probability, the activation curve, the latest images), and the
//! renderings of its results ([`Optimized`], [`TextualExplanation`]) as a cell's last expression.
//!
//! ```no_run
//! # use diffexplainer::explain::*;
//! # fn main() -> anyhow::Result<()> {
//! # let pipeline = DiffusionPipeline::new(ModelBundle::tiny_random(0)?, PipelineOptions::default())?;
//! # let mut prompt = pipeline.new_prompt("A texture of {}", 1, &SoftPromptInit::Random { seed: 0 })?;
//! # let (config, cancel) = (OptimizeConfig::default(), CancelToken::new());
//! let mut live = LiveView::new("class 3");
//! let result = optimize(&pipeline, &mut prompt, &Objective::logit(3), Some(3), &config, &cancel,
//!     |m, images| live.observe(m, images))?;
//! live.finish(&result);
//! // In a notebook, `result` as a cell's last expression renders the best images and curves.
//! # Ok(()) }
//! ```

use std::fmt::Write as _;

use candle_core::Tensor;

use super::optimize::{IterationMetrics, Optimized};
use super::record::RunRecord;
use super::tokens::TextualExplanation;
use crate::display::{self, html_escape, show_updatable, Display, DisplayHandle, RateLimit};
use crate::plot::LineChart;

/// The objective per iteration (what the loop maximizes: a logit, a neuron's activation, a
/// feature sum), with the best iteration marked.
pub fn activation_chart(metrics: &[IterationMetrics]) -> LineChart {
    let best = metrics
        .iter()
        .filter(|m| m.objective.is_finite())
        .max_by(|a, b| a.objective.total_cmp(&b.objective));
    let mut chart = LineChart::new("objective per iteration")
        .labels("iteration", "objective")
        .series(
            "objective",
            metrics.iter().map(|m| (m.iteration as f64, m.objective)),
        );
    if let Some(b) = best {
        chart = chart.marker(b.iteration as f64, "best");
    }
    chart
}

/// The target class's probability per iteration, when the run has a target class.
pub fn probability_chart(metrics: &[IterationMetrics]) -> Option<LineChart> {
    let points: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m.iteration as f64, m.target_probability?)))
        .collect();
    (!points.is_empty()).then(|| {
        LineChart::new("target probability per iteration")
            .labels("iteration", "probability")
            .series("p(target)", points)
    })
}

/// A live output for the optimization loop: call [`LiveView::observe`] from `optimize`'s
/// `on_iteration` callback. It keeps every iteration's metrics but renders at most
/// `max_per_second` times a second (default 2: each update resends the images and the chart);
/// [`LiveView::finish`] renders the final state.
#[derive(Debug)]
pub struct LiveView {
    title: String,
    handle: Option<DisplayHandle>,
    rate: RateLimit,
    history: Vec<IterationMetrics>,
    /// Images of the newest iteration when it has not been rendered yet.
    unrendered: Option<Tensor>,
    renders: usize,
}

impl LiveView {
    pub fn new(title: impl Into<String>) -> Self {
        Self::with_rate(title, 2.0)
    }
    pub fn with_rate(title: impl Into<String>, max_per_second: f64) -> Self {
        Self {
            title: title.into(),
            handle: None,
            rate: RateLimit::per_second(max_per_second),
            history: Vec::new(),
            unrendered: None,
            renders: 0,
        }
    }

    /// Records one iteration; renders if the rate limit allows. Never fails the run: a view
    /// that cannot render shows the error as text instead.
    pub fn observe(&mut self, metrics: &IterationMetrics, images: &Tensor) -> anyhow::Result<()> {
        self.history.push(metrics.clone());
        // A handle on the same storage, not a copy: it is read only when rendering.
        self.unrendered = Some(images.clone());
        if self.rate.due() {
            self.render(None);
        }
        Ok(())
    }

    /// Renders the final state: the last iteration's metrics and the best images.
    pub fn finish(&mut self, result: &Optimized) {
        self.unrendered = Some(result.best_images.clone());
        self.render(Some(result));
    }

    /// Iterations seen so far.
    pub fn history(&self) -> &[IterationMetrics] {
        &self.history
    }
    /// How many times the output was (re)drawn.
    pub fn renders(&self) -> usize {
        self.renders
    }

    fn render(&mut self, done: Option<&Optimized>) {
        let images = self.unrendered.take();
        let display = self.view(images.as_ref(), done).unwrap_or_else(|e| {
            Display::new().text(format!("{}: cannot render: {e:#}", self.title))
        });
        match &self.handle {
            Some(h) => h.update(&display),
            None => self.handle = Some(show_updatable(&display)),
        }
        self.rate.mark();
        self.renders += 1;
    }

    /// The output for the current state (public so it can be tested and reused).
    pub fn view(
        &self,
        images: Option<&Tensor>,
        done: Option<&Optimized>,
    ) -> anyhow::Result<Display> {
        let Some(last) = self.history.last() else {
            return Ok(
                Display::new().text(format!("{}: waiting for the first iteration", self.title))
            );
        };
        let best = self
            .history
            .iter()
            .filter(|m| m.objective.is_finite())
            .max_by(|a, b| a.objective.total_cmp(&b.objective));
        let mut fields = vec![
            ("iteration".to_string(), last.iteration.to_string()),
            ("loss".to_string(), format!("{:.4}", last.loss)),
        ];
        if let Some(p) = last.target_probability {
            fields.push(("target p".into(), format!("{p:.4}")));
        }
        if let Some(b) = best {
            fields.push((
                "best".into(),
                format!("{:.4} @ {}", b.objective, b.iteration),
            ));
        }
        fields.push(("s/it".into(), format!("{:.2}", last.seconds)));
        let status = match done {
            Some(r) => format!("{:?}", r.stop),
            None => "running".to_string(),
        };
        let text = format!(
            "{} [{status}] {}",
            self.title,
            fields
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("  ")
        );

        let mut html = format!(
            "<div class=\"diffexplainer-live\"><div><b>{}</b> <i>{}</i>",
            html_escape(&self.title),
            html_escape(&status)
        );
        for (k, v) in &fields {
            let _ = write!(
                html,
                " &nbsp; {}: <code>{}</code>",
                html_escape(k),
                html_escape(v)
            );
        }
        html.push_str(
            "</div><div style=\"display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start\">",
        );
        if let Some(images) = images {
            html.push_str(&img_tag("latest images", &batch_grid(images)?));
        }
        let svg = activation_chart(&self.history).size(480, 270).to_svg()?;
        let _ = write!(
            html,
            "<img alt=\"objective per iteration\" src=\"data:image/svg+xml;base64,{}\"/>",
            display::base64(svg.as_bytes())
        );
        html.push_str("</div></div>");
        Ok(Display::new().text(text).html(html))
    }
}

/// A batch (N, C, H, W) or one image as a grid of up to 4 per row, 2 px apart.
struct Grid {
    /// The PNG, base64.
    png: String,
    width: usize,
}

fn batch_grid(images: &Tensor) -> anyhow::Result<Grid> {
    let images = display_ready(images)?;
    let list: Vec<Tensor> = match images.rank() {
        4 => (0..images.dim(0)?)
            .map(|i| images.get(i))
            .collect::<candle_core::Result<_>>()?,
        _ => vec![images],
    };
    let cols = list.len().clamp(1, 4);
    let width = cols * list[0].dim(candle_core::D::Minus1)? + (cols - 1) * 2;
    let png = display::image_grid(&list, 4, 2)?
        .get("image/png")
        .unwrap_or_default()
        .to_string();
    Ok(Grid { png, width })
}

/// An `<img>` for a grid: small images (the tiny models make 32²) are scaled up by a whole
/// factor with crisp pixels; large ones are capped at 512 px wide.
fn img_tag(alt: &str, grid: &Grid) -> String {
    let style = if grid.width > 0 && grid.width < 256 {
        let scale = 256usize.div_ceil(grid.width);
        format!("width:{}px;image-rendering:pixelated", grid.width * scale)
    } else {
        "max-width:512px".to_string()
    };
    format!(
        "<img alt=\"{}\" style=\"{style}\" src=\"data:image/png;base64,{}\"/>",
        html_escape(alt),
        grid.png
    )
}

/// Images moved to the CPU as f32 (the grid encoder reads them there).
fn display_ready(images: &Tensor) -> anyhow::Result<Tensor> {
    Ok(images
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?)
}

impl Optimized {
    /// Summary line, the best images and the curves, for a notebook.
    pub fn display(&self) -> anyhow::Result<Display> {
        let summary = format!(
            "{:?} after {} iteration(s): best objective {:.4} at iteration {}",
            self.stop,
            self.metrics.len(),
            self.best_objective,
            self.best_iteration
        );
        let grid = batch_grid(&self.best_images)?;
        let mut html = format!(
            "<div class=\"diffexplainer-result\"><div>{}</div>\
             <div style=\"display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start\">{}",
            html_escape(&summary),
            img_tag("best images", &grid)
        );
        let png = grid.png;
        let mut charts = vec![activation_chart(&self.metrics)];
        charts.extend(probability_chart(&self.metrics));
        for chart in &charts {
            let svg = chart.clone().size(480, 270).to_svg()?;
            let _ = write!(
                html,
                "<img alt=\"{}\" src=\"data:image/svg+xml;base64,{}\"/>",
                html_escape(&chart.title),
                display::base64(svg.as_bytes())
            );
        }
        html.push_str("</div></div>");
        Ok(Display::new()
            .text(summary)
            .html(html)
            .with("image/png", png))
    }

    /// Called by evcxr when the result is a cell's last expression.
    pub fn evcxr_display(&self) {
        render_or_error(self.display())
    }
}

impl TextualExplanation {
    /// The prompt and, per soft vector, its nearest tokens, as a table.
    pub fn display(&self) -> Display {
        let rows: Vec<Vec<String>> = self
            .nearest
            .iter()
            .enumerate()
            .map(|(j, near)| {
                let tokens = near
                    .iter()
                    .map(|t| format!("{} ({:.3})", t.text, t.cosine))
                    .collect::<Vec<_>>()
                    .join(", ");
                vec![j.to_string(), tokens]
            })
            .collect();
        let table = display::table(&["vector", "nearest tokens (cosine)"], &rows);
        let html = format!(
            "<div><b>prompt:</b> <code>{}</code></div>{}",
            html_escape(&self.prompt),
            table.get("text/html").unwrap_or_default()
        );
        Display::new().text(self.to_string()).html(html)
    }

    /// Called by evcxr when the explanation is a cell's last expression.
    pub fn evcxr_display(&self) {
        self.display().evcxr_display()
    }
}

impl RunRecord {
    /// A record read back from disk: what was optimized, how it ended (or that it did not),
    /// the objective curve, the best images and the explanation when the run finished.
    pub fn display(&self) -> anyhow::Result<Display> {
        let status = match &self.summary {
            Some(s) => format!(
                "{} after {} iteration(s): best objective {:.4} at iteration {}",
                s.stop, s.iterations, s.best_objective, s.best_iteration
            ),
            None => format!(
                "unfinished: {} iteration(s) recorded",
                self.iterations_recorded
            ),
        };
        let title = format!(
            "{} — {} ({})",
            self.dir.display(),
            self.config.objective_text,
            status
        );
        let mut html = format!(
            "<div class=\"diffexplainer-record\"><div>{}</div>",
            html_escape(&title)
        );
        let mut display = Display::new();
        html.push_str("<div style=\"display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start\">");
        if self.summary.is_some() {
            let grid = batch_grid(&self.best_images()?)?;
            html.push_str(&img_tag("best images", &grid));
            display = display.with("image/png", grid.png);
        }
        if !self.objectives.is_empty() {
            let chart = LineChart::new("objective per iteration")
                .labels("iteration", "objective")
                .series(
                    "objective",
                    self.objectives
                        .iter()
                        .enumerate()
                        .map(|(i, &o)| (i as f64, o)),
                )
                .size(480, 270);
            let _ = write!(
                html,
                "<img alt=\"objective per iteration\" src=\"data:image/svg+xml;base64,{}\"/>",
                display::base64(chart.to_svg()?.as_bytes())
            );
        }
        html.push_str("</div>");
        let mut text = title;
        if let Some(e) = self.summary.as_ref().and_then(|s| s.explanation.as_ref()) {
            html.push_str(e.display().get("text/html").unwrap_or_default());
            text.push('\n');
            text.push_str(&e.to_string());
        }
        html.push_str("</div>");
        Ok(display.text(text).html(html))
    }

    /// Called by evcxr when the record is a cell's last expression.
    pub fn evcxr_display(&self) {
        render_or_error(self.display())
    }
}

fn render_or_error(display: anyhow::Result<Display>) {
    match display {
        Ok(d) => d.evcxr_display(),
        Err(e) => Display::new()
            .text(format!("<cannot render: {e:#}>"))
            .evcxr_display(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn metrics(i: usize, objective: f64) -> IterationMetrics {
        IterationMetrics {
            iteration: i,
            loss: -objective,
            objective,
            terms: vec![],
            target_logit: Some(objective),
            target_probability: Some(1.0 / (1.0 + (-objective).exp())),
            top5: vec![],
            grad_norm: 1.0,
            lr: 0.1,
            seconds: 0.5,
        }
    }

    #[test]
    fn view_shows_fields_latest_images_and_the_curve() -> anyhow::Result<()> {
        let mut live = LiveView::with_rate("class 3", 1e-3);
        let images = Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
        for (i, o) in [0.5, 1.5, 1.0].into_iter().enumerate() {
            live.history.push(metrics(i, o));
        }
        let d = live.view(Some(&images), None)?;
        let text = d.get("text/plain").unwrap();
        assert!(
            text.contains("iteration: 2") && text.contains("best: 1.5000 @ 1"),
            "{text}"
        );
        let html = d.get("text/html").unwrap();
        assert!(html.contains("data:image/png;base64,iVBORw0KGgo"));
        // Two 8-pixel images side by side (18 px) are scaled up 15x with crisp pixels.
        assert!(
            html.contains("width:270px;image-rendering:pixelated"),
            "{html}"
        );
        assert!(html.contains("data:image/svg+xml;base64,"));
        Ok(())
    }

    #[test]
    fn observe_renders_at_the_bounded_rate() -> anyhow::Result<()> {
        // 1 render per 1000 s: only the first of many fast iterations renders.
        let mut live = LiveView::with_rate("t", 1e-3);
        let images = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu)?;
        for i in 0..20 {
            live.observe(&metrics(i, i as f64), &images)?;
        }
        assert_eq!(live.renders(), 1);
        assert_eq!(live.history().len(), 20);
        Ok(())
    }

    #[test]
    fn charts_follow_the_metrics() {
        let m: Vec<_> = (0..5)
            .map(|i| metrics(i, [1.0, 3.0, 2.0, f64::NAN, 2.5][i]))
            .collect();
        let a = activation_chart(&m);
        assert_eq!(a.markers, vec![(1.0, "best".to_string())]);
        assert_eq!(a.series[0].points.len(), 5);
        let p = probability_chart(&m).unwrap();
        assert!(p.series[0]
            .points
            .iter()
            .all(|&(_, y)| y.is_nan() || (0.0..=1.0).contains(&y)));
        let no_target: Vec<_> = m
            .iter()
            .map(|x| IterationMetrics {
                target_probability: None,
                ..x.clone()
            })
            .collect();
        assert!(probability_chart(&no_target).is_none());
    }
}
