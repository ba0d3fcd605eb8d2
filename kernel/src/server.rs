//! The protocol front: five ZeroMQ sockets, message dispatch, and the bridge to evcxr.
//!
//! Threads and ownership:
//! - the **evaluator thread** owns the `evcxr::CommandContext`; shell requests that need it
//!   (execute, complete, inspect) are sent to it as jobs, one at a time;
//! - the **output pump** thread reads the evaluation process's stdout/stderr lines as they are
//!   printed and publishes them (stream, display_data, update_display_data) on iopub;
//! - tokio tasks own the sockets: iopub (fed by a channel, so any thread can publish in order),
//!   heartbeat, shell, control; stdin is shared behind a mutex for `input_request`s.
//!
//! Order on iopub for one execute: busy, execute_input, outputs..., execute_result/error, then
//! the execute_reply on shell, then idle. Before publishing the result the evaluator takes the
//! pump's lock and drains what is left, so no output of a cell arrives after its result.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::markers::{Event, MarkerParser};
use crate::session::Session;
use crate::wire::{ConnectionInfo, HmacSha256, Message};

type Iopub = mpsc::UnboundedSender<Message>;
type Job = Box<dyn FnOnce(&mut Evaluator) + Send>;

pub fn run(info: ConnectionInfo, session: Session) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(info, session))
}

async fn bind<S: Socket>(info: &ConnectionInfo, port: u16) -> Result<S> {
    let mut socket = S::new();
    let endpoint = info.endpoint(port);
    socket
        .bind(&endpoint)
        .await
        .with_context(|| format!("binding {endpoint}"))?;
    Ok(socket)
}

fn to_zmq(parts: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(parts).expect("messages have parts")
}

/// Receives the next message that parses and verifies; others are logged and dropped.
async fn recv_verified<S: SocketRecv>(
    socket: &mut S,
    mac: Option<&HmacSha256>,
    name: &str,
) -> Result<Message> {
    loop {
        let raw = socket.recv().await?;
        match Message::from_parts(raw.into_vec(), mac) {
            Ok(m) => return Ok(m),
            Err(e) => eprintln!("diffexplainer-kernel: {name}: rejected message: {e}"),
        }
    }
}

async fn serve(info: ConnectionInfo, session: Session) -> Result<()> {
    let mac = info.signer();
    let mut hb: zeromq::RepSocket = bind(&info, info.hb_port).await?;
    let mut shell: zeromq::RouterSocket = bind(&info, info.shell_port).await?;
    let mut control: zeromq::RouterSocket = bind(&info, info.control_port).await?;
    let stdin: zeromq::RouterSocket = bind(&info, info.stdin_port).await?;
    let mut iopub_socket: zeromq::PubSocket = bind(&info, info.iopub_port).await?;

    let (iopub, mut iopub_rx) = mpsc::unbounded_channel::<Message>();
    {
        let mac = mac.clone();
        tokio::spawn(async move {
            while let Some(m) = iopub_rx.recv().await {
                if let Err(e) = iopub_socket.send(to_zmq(m.to_parts(mac.as_ref()))).await {
                    eprintln!("diffexplainer-kernel: iopub send: {e}");
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Ok(ping) = hb.recv().await {
            if hb.send(ping).await.is_err() {
                break;
            }
        }
    });

    let shared = Arc::new(Shared {
        iopub: iopub.clone(),
        mac: mac.clone(),
        stdin: tokio::sync::Mutex::new(stdin),
        runtime: tokio::runtime::Handle::current(),
        session,
        executing: AtomicBool::new(false),
        interrupts: AtomicU32::new(0),
        process: Mutex::new(None),
    });
    let jobs = Evaluator::spawn(shared.clone());

    // Shell: one request at a time, in order.
    {
        let shared = shared.clone();
        let mac = mac.clone();
        tokio::spawn(async move {
            loop {
                let msg = match recv_verified(&mut shell, mac.as_ref(), "shell").await {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("diffexplainer-kernel: shell: {e}");
                        break;
                    }
                };
                for reply in handle_shell(&shared, &jobs, msg).await {
                    if let Err(e) = shell.send(to_zmq(reply.to_parts(mac.as_ref()))).await {
                        eprintln!("diffexplainer-kernel: shell send: {e}");
                    }
                }
            }
        });
    }

    // Control, on this task: interrupt, shutdown, kernel_info.
    loop {
        let msg = recv_verified(&mut control, mac.as_ref(), "control").await?;
        let (reply, stop) = handle_control(&shared, &msg);
        shared
            .iopub
            .send(msg.child("status", json!({"execution_state": "busy"})))
            .ok();
        control.send(to_zmq(reply.to_parts(mac.as_ref()))).await?;
        shared
            .iopub
            .send(msg.child("status", json!({"execution_state": "idle"})))
            .ok();
        if stop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            shared.kill_child();
            shared.session.cleanup();
            std::process::exit(0);
        }
    }
}

/// State shared by the tasks and threads.
pub struct Shared {
    iopub: Iopub,
    mac: Option<HmacSha256>,
    stdin: tokio::sync::Mutex<zeromq::RouterSocket>,
    runtime: tokio::runtime::Handle,
    session: Session,
    executing: AtomicBool,
    /// Interrupt requests during the running cell.
    interrupts: AtomicU32,
    process: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
}

impl Shared {
    fn kill_child(&self) {
        if let Some(p) = self.process.lock().unwrap().as_ref() {
            let _ = p.lock().unwrap().kill();
        }
    }

    /// Asks the user for input through the stdin channel (for `evcxr_input`).
    fn request_input(&self, parent: &Message, prompt: &str, password: bool) -> String {
        if parent.content["allow_stdin"].as_bool() != Some(true) {
            return String::new();
        }
        self.runtime.block_on(async {
            let mut stdin = self.stdin.lock().await;
            let mut req = parent.child(
                "input_request",
                json!({"prompt": prompt, "password": password}),
            );
            req.identities.clone_from(&parent.identities);
            if stdin
                .send(to_zmq(req.to_parts(self.mac.as_ref())))
                .await
                .is_err()
            {
                return String::new();
            }
            match recv_verified(&mut *stdin, self.mac.as_ref(), "stdin").await {
                Ok(reply) => reply.content["value"].as_str().unwrap_or("").to_string(),
                Err(_) => String::new(),
            }
        })
    }
}

fn handle_control(shared: &Shared, msg: &Message) -> (Message, bool) {
    match msg.msg_type() {
        "shutdown_request" => {
            let restart = msg.content["restart"].as_bool().unwrap_or(false);
            (msg.reply(json!({"status": "ok", "restart": restart})), true)
        }
        "interrupt_request" => {
            if shared.executing.load(Ordering::SeqCst) {
                let n = shared.interrupts.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    // Cooperative: loops polling diffexplainer::display::interrupted() stop.
                    let _ = std::fs::write(&shared.session.interrupt_file, b"1");
                } else {
                    // Second request: the cell does not poll; kill the process (state is lost).
                    shared.kill_child();
                }
            }
            (msg.reply(json!({"status": "ok"})), false)
        }
        "kernel_info_request" => (msg.reply(kernel_info()), false),
        other => {
            eprintln!("diffexplainer-kernel: control: unhandled {other}");
            (msg.reply(json!({"status": "error", "ename": "NotImplemented", "evalue": other, "traceback": []})), false)
        }
    }
}

async fn handle_shell(
    shared: &Arc<Shared>,
    jobs: &std::sync::mpsc::Sender<Job>,
    msg: Message,
) -> Vec<Message> {
    let iopub = &shared.iopub;
    iopub
        .send(msg.child("status", json!({"execution_state": "busy"})))
        .ok();
    let replies = match msg.msg_type() {
        "kernel_info_request" => vec![msg.reply(kernel_info())],
        "is_complete_request" => {
            let code = msg.content["code"].as_str().unwrap_or("");
            vec![msg.reply(crate::analysis::is_complete(code))]
        }
        "execute_request" | "complete_request" | "inspect_request" => {
            let (tx, rx) = oneshot::channel();
            let m = msg.clone();
            let job: Job = Box::new(move |ev: &mut Evaluator| {
                let reply = match m.msg_type() {
                    "execute_request" => ev.execute(&m),
                    "complete_request" => ev.complete(&m),
                    _ => ev.inspect(&m),
                };
                let _ = tx.send(reply);
            });
            if jobs.send(job).is_err() {
                vec![msg.reply(json!({"status": "error", "ename": "KernelDead", "evalue": "the evaluator thread stopped", "traceback": []}))]
            } else {
                match rx.await {
                    Ok(reply) => vec![reply],
                    Err(_) => vec![msg.reply(json!({"status": "error", "ename": "KernelDead", "evalue": "the evaluator thread stopped", "traceback": []}))],
                }
            }
        }
        "history_request" => vec![msg.reply(json!({"status": "ok", "history": []}))],
        "comm_info_request" => vec![msg.reply(json!({"status": "ok", "comms": {}}))],
        "comm_open" => {
            // No comm targets: close it right away, as the protocol asks.
            let id = msg.content["comm_id"].clone();
            iopub
                .send(msg.child("comm_close", json!({"comm_id": id, "data": {}})))
                .ok();
            vec![]
        }
        "comm_msg" | "comm_close" => vec![],
        other => {
            eprintln!("diffexplainer-kernel: shell: unhandled {other}");
            vec![]
        }
    };
    iopub
        .send(msg.child("status", json!({"execution_state": "idle"})))
        .ok();
    replies
}

pub fn kernel_info() -> Value {
    json!({
        "status": "ok",
        "protocol_version": "5.3",
        "implementation": "diffexplainer-kernel",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rust",
            "version": crate::session::rustc_version(),
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": format!(
            "diffexplainer-kernel {} - Rust (evcxr {}) with the diffexplainer library preloaded",
            env!("CARGO_PKG_VERSION"), crate::EVCXR_VERSION
        ),
        "help_links": [
            {"text": "Rust std docs", "url": "https://doc.rust-lang.org/stable/std/"},
            {"text": "candle", "url": "https://docs.rs/candle-core/0.11.1/"},
        ],
    })
}

// ---------------------------------------------------------------------------------------------
// Output pump.

struct Pump {
    parser: MarkerParser,
    parent: Option<Message>,
    panics: Vec<(String, String)>,
}

impl Pump {
    fn handle(&mut self, iopub: &Iopub, stream: &str, lines: Vec<String>) {
        let mut events = Vec::new();
        if stream == "stdout" {
            for l in &lines {
                self.parser.line(l, &mut events);
            }
        } else {
            let mut text = String::new();
            for l in &lines {
                text.push_str(l);
                text.push('\n');
            }
            events.push(Event::Text(text));
        }
        let Some(parent) = &self.parent else { return };
        for ev in events {
            let msg = match ev {
                Event::Text(text) => parent.child("stream", json!({"name": stream, "text": text})),
                Event::Display {
                    data,
                    display_id,
                    update,
                } => {
                    let mut content = json!({"data": data, "metadata": {}, "transient": {}});
                    if let Some(id) = display_id {
                        content["transient"] = json!({"display_id": id});
                    }
                    let kind = if update {
                        "update_display_data"
                    } else {
                        "display_data"
                    };
                    parent.child(kind, content)
                }
                Event::Panic { message, location } => {
                    self.panics.push((message, location));
                    continue;
                }
            };
            iopub.send(msg).ok();
        }
    }
}

fn drain(rx: &crossbeam_channel::Receiver<String>) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    lines
}

fn spawn_pump(
    pump: Arc<Mutex<Pump>>,
    iopub: Iopub,
    stdout: crossbeam_channel::Receiver<String>,
    stderr: crossbeam_channel::Receiver<String>,
) {
    std::thread::spawn(move || loop {
        let mut sel = crossbeam_channel::Select::new();
        sel.recv(&stdout);
        sel.recv(&stderr);
        let index = sel.ready();
        // Let a burst of lines arrive so they go out as one message.
        std::thread::sleep(Duration::from_millis(2));
        let mut p = pump.lock().unwrap();
        let (name, rx) = if index == 0 {
            ("stdout", &stdout)
        } else {
            ("stderr", &stderr)
        };
        let lines = drain(rx);
        if lines.is_empty() && rx.is_empty() {
            // Disconnected senders make `ready` return immediately; stop when both are gone.
            if matches!(
                stdout.recv_timeout(Duration::ZERO),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            ) && matches!(
                stderr.recv_timeout(Duration::ZERO),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            ) {
                return;
            }
        }
        p.handle(&iopub, name, lines);
    });
}

// ---------------------------------------------------------------------------------------------
// The evaluator.

pub struct Evaluator {
    ctx: Option<evcxr::CommandContext>,
    startup_error: Option<String>,
    shared: Arc<Shared>,
    pump: Arc<Mutex<Pump>>,
    stdout: Option<crossbeam_channel::Receiver<String>>,
    stderr: Option<crossbeam_channel::Receiver<String>>,
    execution_count: u64,
}

impl Evaluator {
    fn spawn(shared: Arc<Shared>) -> std::sync::mpsc::Sender<Job> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut ev = Evaluator::start(shared);
            while let Ok(job) = rx.recv() {
                job(&mut ev);
            }
        });
        tx
    }

    fn start(shared: Arc<Shared>) -> Evaluator {
        let pump = Arc::new(Mutex::new(Pump {
            parser: MarkerParser::default(),
            parent: None,
            panics: Vec::new(),
        }));
        let mut ev = Evaluator {
            ctx: None,
            startup_error: None,
            shared: shared.clone(),
            pump: pump.clone(),
            stdout: None,
            stderr: None,
            execution_count: 0,
        };
        let t0 = Instant::now();
        match evcxr::CommandContext::new() {
            Ok((ctx, outputs)) => {
                *shared.process.lock().unwrap() = Some(ctx.process_handle());
                ev.stdout = Some(outputs.stdout.clone());
                ev.stderr = Some(outputs.stderr.clone());
                spawn_pump(pump, shared.iopub.clone(), outputs.stdout, outputs.stderr);
                ev.ctx = Some(ctx);
            }
            Err(e) => {
                ev.startup_error = Some(format!("could not start evcxr: {e}"));
                return ev;
            }
        }
        eprintln!("diffexplainer-kernel: evcxr ready in {:.2?}", t0.elapsed());
        let t1 = Instant::now();
        let ctx = ev.ctx.as_mut().unwrap();
        for cmd in shared.session.preload() {
            if let Err(e) = ctx.execute(&cmd) {
                let msg = format!(
                    "preloading the diffexplainer library failed at `{cmd}`:\n{}",
                    render_error(&e)
                );
                eprintln!("diffexplainer-kernel: {msg}");
                ev.startup_error = Some(msg);
                break;
            }
        }
        eprintln!(
            "diffexplainer-kernel: library preloaded in {:.2?}",
            t1.elapsed()
        );
        ev
    }

    /// Waits until every line printed so far has been published, then runs `f` under the
    /// pump lock.
    fn with_pump_drained<T>(&self, f: impl FnOnce(&mut Pump) -> T) -> T {
        let mut p = self.pump.lock().unwrap();
        for (name, rx) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if let Some(rx) = rx {
                let lines = drain(rx);
                if !lines.is_empty() {
                    p.handle(&self.shared.iopub, name, lines);
                }
            }
        }
        f(&mut p)
    }

    fn execute(&mut self, msg: &Message) -> Message {
        let code = msg.content["code"].as_str().unwrap_or("").to_string();
        let silent = msg.content["silent"].as_bool().unwrap_or(false);
        let store_history = msg.content["store_history"].as_bool().unwrap_or(true) && !silent;
        if store_history {
            self.execution_count += 1;
        }
        let count = self.execution_count;
        let iopub = self.shared.iopub.clone();
        if !silent {
            iopub
                .send(msg.child(
                    "execute_input",
                    json!({"code": code, "execution_count": count}),
                ))
                .ok();
        }
        let error_reply = |ename: &str, evalue: &str, traceback: Vec<String>| -> Message {
            iopub
                .send(msg.child(
                    "error",
                    json!({"ename": ename, "evalue": evalue, "traceback": traceback}),
                ))
                .ok();
            msg.reply(json!({"status": "error", "execution_count": count, "ename": ename, "evalue": evalue, "traceback": traceback}))
        };
        if let Some(e) = &self.startup_error {
            let e = e.clone();
            return error_reply(
                "KernelStartupError",
                &e,
                e.lines().map(str::to_string).collect(),
            );
        }
        let Some(ctx) = self.ctx.as_mut() else {
            unreachable!()
        };

        let _ = std::fs::remove_file(&self.shared.session.interrupt_file);
        self.shared.interrupts.store(0, Ordering::SeqCst);
        {
            let mut p = self.pump.lock().unwrap();
            p.parent = Some(msg.clone());
            p.panics.clear();
        }
        self.shared.executing.store(true, Ordering::SeqCst);
        let shared = self.shared.clone();
        let parent = msg.clone();
        let result = ctx.execute_with_callbacks(
            &code,
            &mut evcxr::EvalCallbacks {
                input_reader: &|req| shared.request_input(&parent, &req.prompt, req.is_password),
            },
        );
        self.shared.executing.store(false, Ordering::SeqCst);
        let interrupted = std::fs::remove_file(&self.shared.session.interrupt_file).is_ok();

        // The child's stderr is a separate pipe read by an evcxr thread: what the cell wrote
        // there is (in practice) in our channel within a few ms of the cell's end.
        std::thread::sleep(Duration::from_millis(15));
        let panics = self.with_pump_drained(|p| {
            let mut events = Vec::new();
            p.parser.finish(&mut events);
            let text: String = events
                .into_iter()
                .filter_map(|e| {
                    if let Event::Text(t) = e {
                        Some(t)
                    } else {
                        None
                    }
                })
                .collect();
            if !text.is_empty() {
                iopub
                    .send(msg.child("stream", json!({"name": "stdout", "text": text})))
                    .ok();
            }
            std::mem::take(&mut p.panics)
        });
        // stderr (the default panic message) may trail stdout: give it a moment, then drain.
        if !panics.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            self.with_pump_drained(|_| ());
        }

        let reply = match result {
            Ok(output) => {
                if let Some((message, location)) = panics.first() {
                    let mut tb = vec![format!("thread panicked at {location}:"), message.clone()];
                    tb.push("(variables defined before this cell are kept)".to_string());
                    error_reply("panic", message, tb)
                } else {
                    if !output.content_by_mime_type.is_empty() && !silent {
                        let mut data = Map::new();
                        for (mime, content) in output.content_by_mime_type {
                            let v = if mime.ends_with("json") {
                                serde_json::from_str(&content).unwrap_or(Value::String(content))
                            } else {
                                Value::String(content)
                            };
                            data.insert(mime, v);
                        }
                        iopub
                            .send(msg.child(
                                "execute_result",
                                json!({"execution_count": count, "data": data, "metadata": {}}),
                            ))
                            .ok();
                    }
                    msg.reply(json!({"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []}))
                }
            }
            Err(evcxr::Error::CompilationErrors(errors)) => {
                let mut first: Option<(String, Vec<String>)> = None;
                for error in &errors {
                    let tb = compile_error_traceback(error, &code, count);
                    iopub
                        .send(msg.child("error", json!({"ename": "CompilationError", "evalue": error.message(), "traceback": tb})))
                        .ok();
                    first.get_or_insert((error.message(), tb));
                }
                let (evalue, tb) = first.unwrap_or_default();
                msg.reply(json!({"status": "error", "execution_count": count, "ename": "CompilationError", "evalue": evalue, "traceback": tb}))
            }
            Err(evcxr::Error::SubprocessTerminated(why)) => {
                let text = if self.shared.interrupts.load(Ordering::SeqCst) > 1 {
                    "Interrupted twice: the evaluation process was killed and restarted; variables were lost.".to_string()
                } else {
                    format!("The evaluation process died ({why}); it was restarted and variables were lost.")
                };
                error_reply("ProcessTerminated", &text, vec![text.clone()])
            }
            Err(e) => {
                let text = render_error(&e);
                error_reply("Error", &text, text.lines().map(str::to_string).collect())
            }
        };
        if interrupted {
            iopub
                .send(msg.child("stream", json!({"name": "stderr", "text": "[interrupted: the cell stopped at its next check; variables are kept]\n"})))
                .ok();
        }
        self.pump.lock().unwrap().parent = None;
        reply
    }

    fn complete(&mut self, msg: &Message) -> Message {
        let code = msg.content["code"].as_str().unwrap_or("");
        let cursor = msg.content["cursor_pos"].as_u64().unwrap_or(0) as usize;
        let byte = crate::analysis::char_to_byte(code, cursor);
        let empty = json!({"status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}});
        let Some(ctx) = self.ctx.as_mut() else {
            return msg.reply(empty);
        };
        match ctx.completions(code, byte) {
            Ok(c) => {
                let matches: Vec<String> = c.completions.iter().map(|c| c.code.clone()).collect();
                let start = crate::analysis::byte_to_char(code, c.start_offset);
                let end = crate::analysis::byte_to_char(code, c.end_offset);
                let types: Vec<Value> = c
                    .completions
                    .iter()
                    .map(|c| json!({"text": c.code, "type": c.kind, "start": start, "end": end, "signature": c.label}))
                    .collect();
                msg.reply(json!({
                    "status": "ok", "matches": matches, "cursor_start": start, "cursor_end": end,
                    "metadata": {"_jupyter_types_experimental": types},
                }))
            }
            Err(_) => msg.reply(empty),
        }
    }

    fn inspect(&mut self, msg: &Message) -> Message {
        let code = msg.content["code"].as_str().unwrap_or("");
        let cursor = msg.content["cursor_pos"].as_u64().unwrap_or(0) as usize;
        let byte = crate::analysis::char_to_byte(code, cursor);
        let not_found = json!({"status": "ok", "found": false, "data": {}, "metadata": {}});
        let Some(ctx) = self.ctx.as_mut() else {
            return msg.reply(not_found);
        };
        match ctx.hover_at(code, byte) {
            Ok((plain, _)) if plain == "No documentation found" => msg.reply(not_found),
            Ok((plain, html)) => msg.reply(json!({
                "status": "ok", "found": true, "data": {"text/plain": plain, "text/html": html}, "metadata": {},
            })),
            Err(_) => msg.reply(not_found),
        }
    }
}

fn render_error(e: &evcxr::Error) -> String {
    match e {
        evcxr::Error::CompilationErrors(errors) => errors
            .iter()
            .map(|e| e.rendered())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// rustc's diagnostic, mapped onto the cell's own lines when it comes from user code.
fn compile_error_traceback(
    error: &evcxr::CompilationError,
    source: &str,
    count: u64,
) -> Vec<String> {
    if error.is_from_user_code() {
        let file_name = format!("cell[{count}]");
        if let Some(report) =
            error.build_report(file_name.clone(), source.to_string(), evcxr::Theme::Light)
        {
            let mut out = Vec::new();
            if report
                .write(ariadne::sources([(file_name, source)]), &mut out)
                .is_ok()
            {
                return String::from_utf8_lossy(&out)
                    .lines()
                    .map(str::to_string)
                    .collect();
            }
        }
    }
    let rendered = error.rendered();
    if rendered.is_empty() {
        let mut tb = vec![error.message()];
        tb.extend(error.help().into_iter().map(|h| format!("help: {h}")));
        tb
    } else {
        rendered.lines().map(str::to_string).collect()
    }
}
