//! Rich display for notebooks: a plain-text marker protocol on stdout, so this library renders
//! in Jupyter without depending on any kernel crate.
//!
//! Two wire formats, chosen at run time:
//!
//! * Under the `diffexplainer-kernel` (which sets `DIFFEXPLAINER_KERNEL=1` in the evaluation
//!   process), [`show`] prints a *display frame*: one line that starts with [`FRAME_GUARD`]
//!   (the ASCII control characters RS and US around `EVCXR`, the control-frame guard of the
//!   kernel's vendored evcxr) and holds one JSON object. The kernel recognises a frame anywhere
//!   in the output, even after a partial line (`print!("x"); show(..)`), and turns it into one
//!   `display_data` message as soon as it arrives, or into `update_display_data` when it says
//!   `"update": true` — so a cell can have many outputs and live-updating ones:
//!
//!   ```text
//!   <RS>EVCXR<US>DIFFEXPLAINER_DISPLAY {"display_id":"de-1a2b","update":false,"data":{"image/png":"iVBORw0KGgo...","text/plain":"<Image 64x64>"}}
//!   ```
//!
//!   JSON escapes newlines and control characters, so a frame is always exactly one line.
//!
//! * Anywhere else (plain `evcxr_jupyter`, a terminal), [`show`] prints evcxr's own blocks
//!   (`EVCXR_BEGIN_CONTENT mime` ... `EVCXR_END_CONTENT`); evcxr shows the last block of each
//!   MIME type as the cell's result, and updates degrade to that.
//!
//! A value that is a cell's last expression renders through its `evcxr_display` method (evcxr
//! calls it when it exists); [`Display::evcxr_display`] prints evcxr blocks, which both kernels
//! turn into the cell's `execute_result`. Library types render by building a [`Display`].
//!
//! Interrupts: the kernel never kills the evaluation process on the first interrupt; it raises a
//! flag that long loops poll with [`interrupted`] (see its documentation for the contract).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

/// Environment variable the kernel sets in the evaluation process.
pub const KERNEL_ENV: &str = "DIFFEXPLAINER_KERNEL";
/// Starts every control frame on the evaluation process's stdout under the kernel (its vendored
/// evcxr's guard; see `vendor/README.md`): text output does not contain it by accident.
pub const FRAME_GUARD: &str = "\u{1e}EVCXR\u{1f}";
/// Environment variable naming the file whose existence means "interrupt requested".
pub const INTERRUPT_FILE_ENV: &str = "DIFFEXPLAINER_INTERRUPT_FILE";

/// One output: the same content under one or more MIME types (the frontend picks the richest).
/// Binary types (`image/png`) hold base64 text, as Jupyter's wire format does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Display {
    /// (MIME type, content) pairs in insertion order.
    pub data: Vec<(String, String)>,
}

impl Display {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) the content for one MIME type.
    pub fn with(mut self, mime: &str, content: impl Into<String>) -> Self {
        let content = content.into();
        match self.data.iter_mut().find(|(m, _)| m == mime) {
            Some(slot) => slot.1 = content,
            None => self.data.push((mime.to_string(), content)),
        }
        self
    }
    pub fn text(self, text: impl Into<String>) -> Self {
        self.with("text/plain", text)
    }
    pub fn html(self, html: impl Into<String>) -> Self {
        self.with("text/html", html)
    }
    pub fn svg(self, svg: impl Into<String>) -> Self {
        self.with("image/svg+xml", svg)
    }
    /// PNG file bytes (base64-encoded here).
    pub fn png(self, png_bytes: &[u8]) -> Self {
        self.with("image/png", base64(png_bytes))
    }
    pub fn get(&self, mime: &str) -> Option<&str> {
        self.data
            .iter()
            .find(|(m, _)| m == mime)
            .map(|(_, c)| c.as_str())
    }

    /// Called by evcxr when this value is a cell's last expression: prints evcxr blocks, which
    /// become the cell's `execute_result`.
    pub fn evcxr_display(&self) {
        let mut out = String::new();
        for (mime, content) in &self.data {
            let _ = write!(
                out,
                "EVCXR_BEGIN_CONTENT {mime}\n{}\nEVCXR_END_CONTENT\n",
                content.trim_end_matches('\n')
            );
        }
        print_atomically(&out);
    }
}

/// True when running under the diffexplainer kernel (display frames and updates supported).
pub fn in_kernel() -> bool {
    std::env::var_os(KERNEL_ENV).is_some()
}

/// The display frame for `display` (public so the format is testable and documented): one line,
/// [`FRAME_GUARD`], `DIFFEXPLAINER_DISPLAY `, a JSON object with `display_id` (if any),
/// `update` and `data` (MIME type to content).
pub fn display_block(display: &Display, display_id: Option<&str>, update: bool) -> String {
    let mut out = format!("{FRAME_GUARD}DIFFEXPLAINER_DISPLAY {{");
    if let Some(id) = display_id {
        let _ = write!(out, "\"display_id\":\"{}\",", json_escape(id));
    }
    let _ = write!(out, "\"update\":{update},\"data\":{{");
    for (i, (mime, content)) in display.data.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            out,
            "{sep}\"{}\":\"{}\"",
            json_escape(mime),
            json_escape(content.trim_end_matches('\n'))
        );
    }
    out.push_str("}}\n");
    out
}

fn emit(display: &Display, display_id: Option<&str>, update: bool) {
    if in_kernel() {
        print_atomically(&display_block(display, display_id, update));
    } else {
        display.evcxr_display();
    }
}

fn print_atomically(text: &str) {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = lock.write_all(text.as_bytes());
    let _ = lock.flush();
}

/// Shows `display` now, as a new output of the running cell.
pub fn show(display: &Display) {
    emit(display, None, false);
}

/// Shows `display` as an output that can later be replaced in place through the handle.
pub fn show_updatable(display: &Display) -> DisplayHandle {
    let handle = DisplayHandle::new();
    emit(display, Some(&handle.id), false);
    handle
}

/// A display that can be updated in place (`update_display_data`).
#[derive(Debug, Clone)]
pub struct DisplayHandle {
    pub id: String,
}

impl DisplayHandle {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!("diffexplainer-{}-{nanos:x}-{n}", std::process::id()),
        }
    }
    pub fn update(&self, display: &Display) {
        emit(display, Some(&self.id), true);
    }
}

/// Live progress of a long loop: one output updated in place at most `max_per_second` times a
/// second (default 4); the first and the [`Progress::finish`] call always render.
#[derive(Debug)]
pub struct Progress {
    handle: Option<DisplayHandle>,
    title: String,
    rate: RateLimit,
    pending: Option<Vec<(String, String)>>,
}

/// At most one render per interval; the first is always due. Shared by [`Progress`] and the
/// explainer's live view, so a display never floods the notebook (each update resends the
/// whole output).
#[derive(Debug, Clone)]
pub struct RateLimit {
    min_interval: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    pub fn per_second(max_per_second: f64) -> Self {
        Self {
            min_interval: Duration::from_secs_f64(1.0 / max_per_second.max(1e-3)),
            last: None,
        }
    }
    /// Whether a render now would respect the limit.
    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.min_interval)
    }
    /// Records that a render happened now.
    pub fn mark(&mut self) {
        self.last = Some(Instant::now());
    }
}

impl Progress {
    pub fn new(title: impl Into<String>) -> Self {
        Self::with_rate(title, 4.0)
    }
    pub fn with_rate(title: impl Into<String>, max_per_second: f64) -> Self {
        Self {
            handle: None,
            title: title.into(),
            rate: RateLimit::per_second(max_per_second),
            pending: None,
        }
    }
    /// Records the latest fields (name, value); renders if the rate limit allows. Returns
    /// whether it rendered.
    pub fn update(&mut self, fields: &[(&str, String)]) -> bool {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let due = self.rate.due();
        if due {
            self.render(&fields, false);
            self.pending = None;
        } else {
            self.pending = Some(fields);
        }
        due
    }
    /// Renders the last recorded fields (if not yet shown) and marks the progress finished.
    pub fn finish(&mut self, note: &str) {
        let fields = self.pending.take().unwrap_or_default();
        let mut fields = fields;
        if !note.is_empty() {
            fields.push(("status".into(), note.into()));
        }
        self.render(&fields, true);
    }
    fn render(&mut self, fields: &[(String, String)], done: bool) {
        let text = fields
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("  ");
        let mut html = format!(
            "<div class=\"diffexplainer-progress\"><b>{}</b>{} ",
            html_escape(&self.title),
            if done { "" } else { " &#8230;" }
        );
        for (k, v) in fields {
            let _ = write!(
                html,
                "&nbsp; {}: <code>{}</code>",
                html_escape(k),
                html_escape(v)
            );
        }
        html.push_str("</div>");
        let display = Display::new()
            .text(format!("{}: {text}", self.title))
            .html(html);
        match &self.handle {
            Some(handle) => handle.update(&display),
            None => self.handle = Some(show_updatable(&display)),
        }
        self.rate.mark();
    }
}

/// Whether the user asked to interrupt the running cell (the notebook's stop button).
///
/// Contract for long loops (the explainer's optimization loop and any user loop): call this once
/// per iteration; when it returns true, stop *after* finishing the current iteration's
/// bookkeeping and return the best result so far as a normal value (not an error, not a panic).
/// The kernel then ends the cell normally, so the session's variables survive. The flag is a
/// file (path in `DIFFEXPLAINER_INTERRUPT_FILE`) that the kernel creates on interrupt and removes
/// when the next cell starts, so it is seen by every copy of this library in the process and
/// costs one `stat` per call. A loop that never polls cannot be stopped this way; a second
/// interrupt makes the kernel kill the evaluation process (variables are then lost).
pub fn interrupted() -> bool {
    match std::env::var_os(INTERRUPT_FILE_ENV) {
        Some(path) => std::path::Path::new(&path).exists(),
        None => false,
    }
}

/// Acknowledges an interrupt (removes the flag) so a later loop in the same cell runs.
pub fn clear_interrupt() {
    if let Some(path) = std::env::var_os(INTERRUPT_FILE_ENV) {
        let _ = std::fs::remove_file(path);
    }
}

/// Installed by the kernel at start: reports panics as a frame (`DIFFEXPLAINER_PANIC {json}`)
/// the kernel turns into an `error` message; the default hook does not run (its message would
/// repeat the error on stderr).
pub fn install_kernel_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "Box<dyn Any>".to_string()
        };
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        if !in_kernel() {
            return default(info);
        }
        print_atomically(&format!(
            "{FRAME_GUARD}DIFFEXPLAINER_PANIC {{\"message\":\"{}\",\"location\":\"{}\"}}\n",
            json_escape(&message),
            json_escape(location.as_deref().unwrap_or(""))
        ));
    }));
}

// ---------------------------------------------------------------------------------------------
// Builders for common outputs.

/// An image from a tensor: (C, H, W) or (1, C, H, W) with C = 1 or 3, or (H, W); values in
/// [0, 1] (clamped). Renders as PNG with a text fallback.
pub fn image(tensor: &Tensor) -> candle_core::Result<Display> {
    let (c, h, w, pixels) = tensor_to_hwc_u8(tensor)?;
    let png = encode_png(w, h, c, &pixels)?;
    Ok(Display::new()
        .png(&png)
        .text(format!("<image {w}x{h}, {c} channel(s)>")))
}

/// A grid of same-sized images (each as in [`image()`], or a batch (N, C, H, W) passed as one
/// element per image), `cols` per row, separated by `pad` white pixels.
pub fn image_grid(tensors: &[Tensor], cols: usize, pad: usize) -> candle_core::Result<Display> {
    let mut images = Vec::new();
    for t in tensors {
        images.push(tensor_to_hwc_u8(t)?);
    }
    let Some(&(_, h, w, _)) = images.first() else {
        return Ok(Display::new().text("<empty image grid>"));
    };
    if images.iter().any(|&(_, ih, iw, _)| ih != h || iw != w) {
        candle_core::bail!("image_grid: all images must have the same size");
    }
    let cols = cols.max(1).min(images.len());
    let rows = images.len().div_ceil(cols);
    let (gw, gh) = (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad);
    let mut grid = vec![255u8; gw * gh * 3];
    for (i, (c, _, _, px)) in images.iter().enumerate() {
        let (ox, oy) = ((i % cols) * (w + pad), (i / cols) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    let v = px[(y * w + x) * c + if *c == 1 { 0 } else { k }];
                    grid[((oy + y) * gw + ox + x) * 3 + k] = v;
                }
            }
        }
    }
    let png = encode_png(gw, gh, 3, &grid)?;
    Ok(Display::new().png(&png).text(format!(
        "<image grid {} images, {rows}x{cols}>",
        images.len()
    )))
}

/// An HTML table (cells escaped) with a plain-text fallback.
pub fn table<S: AsRef<str>>(headers: &[S], rows: &[Vec<String>]) -> Display {
    let mut html = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(html, "<th>{}</th>", html_escape(h.as_ref()));
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{}</td>", html_escape(cell));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    let mut text = headers
        .iter()
        .map(|h| h.as_ref())
        .collect::<Vec<_>>()
        .join("\t");
    for row in rows {
        text.push('\n');
        text.push_str(&row.join("\t"));
    }
    Display::new().html(html).text(text)
}

/// An SVG (e.g. a plotters `SVGBackend` string), with an optional PNG fallback for frontends
/// that do not render SVG.
pub fn svg(svg: impl Into<String>, png_fallback: Option<&[u8]>) -> Display {
    let mut d = Display::new().svg(svg).text("<svg chart>");
    if let Some(png) = png_fallback {
        d = d.png(png);
    }
    d
}

/// A newtype that renders a tensor as an image when it is a cell's last expression.
#[derive(Debug, Clone)]
pub struct Image(pub Tensor);

impl Image {
    pub fn evcxr_display(&self) {
        match image(&self.0) {
            Ok(d) => d.evcxr_display(),
            Err(e) => Display::new()
                .text(format!("<image error: {e}>"))
                .evcxr_display(),
        }
    }
}

fn tensor_to_hwc_u8(t: &Tensor) -> candle_core::Result<(usize, usize, usize, Vec<u8>)> {
    let t = match t.rank() {
        4 if t.dim(0)? == 1 => t.squeeze(0)?,
        2 => t.unsqueeze(0)?,
        3 => t.clone(),
        _ => candle_core::bail!(
            "image: expected (C,H,W), (1,C,H,W) or (H,W), got {:?}",
            t.shape()
        ),
    };
    let (c, h, w) = t.dims3()?;
    if c != 1 && c != 3 {
        candle_core::bail!("image: expected 1 or 3 channels, got {c}");
    }
    let hwc = t
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels = hwc
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok((c, h, w, pixels))
}

// ---------------------------------------------------------------------------------------------
// Encoders: PNG through the `image` crate (fast deflate: live updates resend the image several
// times a second, so size matters more than the last few percent of compression), base64.

/// Encodes 8-bit pixels (`channels` = 1 gray, 3 RGB, 4 RGBA; row-major HWC) as a PNG file.
pub fn encode_png(
    width: usize,
    height: usize,
    channels: usize,
    pixels: &[u8],
) -> candle_core::Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{ExtendedColorType, ImageEncoder};
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        4 => ExtendedColorType::Rgba8,
        _ => candle_core::bail!("encode_png: channels must be 1, 3 or 4, got {channels}"),
    };
    if pixels.len() != width * height * channels {
        candle_core::bail!(
            "encode_png: {} bytes for a {width}x{height} image with {channels} channel(s) (expected {})",
            pixels.len(),
            width * height * channels
        )
    }
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Adaptive)
        .write_image(pixels, width as u32, height as u32, color)
        .map_err(|e| candle_core::Error::Msg(format!("encode_png: {e}")))?;
    Ok(png)
}

/// Standard base64 with padding (RFC 4648), as Jupyter expects for binary MIME types.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn png_round_trips_through_a_decoder() {
        let pixels = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        let png = encode_png(2, 2, 3, &pixels).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (2, 2));
        assert_eq!(back.as_raw().as_slice(), &pixels);
        let err = encode_png(2, 2, 3, &pixels[..11]).unwrap_err().to_string();
        assert!(err.contains("11 bytes") && err.contains("2x2"), "{err}");
        assert!(encode_png(1, 1, 2, &[0, 0]).is_err());
    }

    #[test]
    fn display_block_format() {
        let d = Display::new().text("hi\n").html("<b>hi</b>");
        let block = display_block(&d, Some("id\"1"), true);
        assert_eq!(
            block,
            "\u{1e}EVCXR\u{1f}DIFFEXPLAINER_DISPLAY {\"display_id\":\"id\\\"1\",\"update\":true,\
             \"data\":{\"text/plain\":\"hi\",\"text/html\":\"<b>hi</b>\"}}\n"
        );
        // One line whatever the content: newlines and control characters are escaped.
        let d = Display::new().text("a\nb\u{1e}EVCXR\u{1f}c");
        assert_eq!(display_block(&d, None, false).lines().count(), 1);
    }

    #[test]
    fn image_grid_from_tensors() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::zeros((3, 4, 5), DType::F32, &dev)?;
        let b = Tensor::ones((1, 4, 5), DType::F32, &dev)?;
        let d = image_grid(&[a.clone(), b, a], 2, 1)?;
        assert!(d.get("image/png").unwrap().starts_with("iVBORw0KGgo"));
        assert!(image(&Tensor::zeros((2, 4, 5), DType::F32, &dev)?).is_err());
        Ok(())
    }

    #[test]
    fn progress_is_rate_limited() {
        let mut p = Progress::with_rate("t", 2.0);
        assert!(p.update(&[("iter", "0".into())]));
        assert!(!p.update(&[("iter", "1".into())]));
        assert_eq!(p.pending.as_ref().unwrap()[0].1, "1");
    }
}
