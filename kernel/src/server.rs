//! The protocol front: five ZeroMQ sockets, message dispatch, and the bridge to evcxr.
//!
//! Threads and ownership:
//! - the **evaluator thread** owns the `evcxr::CommandContext`; shell requests that need it
//!   (execute, complete, inspect) are queued to it as jobs and run one at a time, in order;
//! - the **shell task** answers `kernel_info`, `comm_info`, `is_complete` and `history` at once,
//!   also while a cell runs, and sends the evaluator's replies as they come;
//! - the **output pump** thread publishes the evaluation process's stdout/stderr (stream,
//!   display_data, update_display_data) on iopub as it is printed;
//! - tokio tasks own the sockets: iopub (fed by a channel, so any thread can publish in order),
//!   heartbeat, shell, control; stdin is shared behind a mutex for `input_request`s.
//!
//! Order on iopub for one execute: busy, execute_input, outputs..., execute_result/error, then
//! the execute_reply on shell, then idle. Before publishing the result the evaluator takes the
//! pump's lock and drains what is left, so no output of a cell arrives after its result.
//!
//! After a cell fails (compile error, panic, an `Err` at `?` or as the final value) and its
//! request had `stop_on_error` (the default), every execute request queued before the failure
//! is answered `status: aborted` without running, as ipykernel does.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::markers::{parse_piece, Event};
use crate::session::Session;
use crate::wire::{ConnectionInfo, HmacSha256, Message};

type Iopub = mpsc::UnboundedSender<Message>;
type Replies = mpsc::UnboundedSender<Message>;

/// A shell request for the evaluator, with its place in the queue.
struct Job {
    msg: Message,
    seq: u64,
}

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

    let (replies, mut replies_rx) = mpsc::unbounded_channel::<Message>();
    let shared = Arc::new(Shared {
        iopub: iopub.clone(),
        replies,
        mac: mac.clone(),
        stdin: tokio::sync::Mutex::new(stdin),
        runtime: tokio::runtime::Handle::current(),
        session,
        executing: AtomicBool::new(false),
        evaluator_busy: AtomicBool::new(false),
        interrupts: AtomicU32::new(0),
        process: Mutex::new(None),
        queued: AtomicU64::new(0),
        history: Mutex::new(Vec::new()),
    });
    let jobs = Evaluator::spawn(shared.clone());

    // Shell: requests the evaluator does not need are answered at once; the others are queued
    // to it and their replies sent here when they come.
    {
        let shared = shared.clone();
        let mac = mac.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = recv_verified(&mut shell, mac.as_ref(), "shell") => {
                        let msg = match msg {
                            Ok(m) => m,
                            Err(e) => {
                                eprintln!("diffexplainer-kernel: shell: {e}");
                                break;
                            }
                        };
                        for reply in handle_shell(&shared, &jobs, msg) {
                            if let Err(e) = shell.send(to_zmq(reply.to_parts(mac.as_ref()))).await {
                                eprintln!("diffexplainer-kernel: shell send: {e}");
                            }
                        }
                    }
                    Some(reply) = replies_rx.recv() => {
                        if let Err(e) = shell.send(to_zmq(reply.to_parts(mac.as_ref()))).await {
                            eprintln!("diffexplainer-kernel: shell send: {e}");
                        }
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
    /// Replies from the evaluator, sent on shell by the shell task.
    replies: Replies,
    mac: Option<HmacSha256>,
    stdin: tokio::sync::Mutex<zeromq::RouterSocket>,
    runtime: tokio::runtime::Handle,
    session: Session,
    /// A cell is running (interrupts apply).
    executing: AtomicBool,
    /// The evaluator is working on a job (the kernel already published `busy`).
    evaluator_busy: AtomicBool,
    /// Interrupt requests during the running cell.
    interrupts: AtomicU32,
    process: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    /// Sequence number of the last job queued to the evaluator.
    queued: AtomicU64,
    /// This session's inputs: (execution_count, code), for `history_request`.
    history: Mutex<Vec<(u64, String)>>,
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

/// Handles one shell request: the replies to send now (none for queued jobs, whose replies the
/// evaluator sends through `Shared::replies`).
fn handle_shell(
    shared: &Arc<Shared>,
    jobs: &std::sync::mpsc::Sender<Job>,
    msg: Message,
) -> Vec<Message> {
    if matches!(
        msg.msg_type(),
        "execute_request" | "complete_request" | "inspect_request"
    ) {
        let seq = shared.queued.fetch_add(1, Ordering::SeqCst) + 1;
        if let Err(e) = jobs.send(Job { msg, seq }) {
            let msg = e.0.msg;
            return vec![msg.reply(json!({"status": "error", "ename": "KernelDead", "evalue": "the evaluator thread stopped", "traceback": []}))];
        }
        return vec![];
    }
    // Answered at once. While the evaluator works the kernel is already `busy`: a busy/idle
    // pair here would show an idle kernel in the middle of a running cell.
    let status = !shared.evaluator_busy.load(Ordering::SeqCst);
    let iopub = &shared.iopub;
    if status {
        iopub
            .send(msg.child("status", json!({"execution_state": "busy"})))
            .ok();
    }
    let replies = match msg.msg_type() {
        "kernel_info_request" => vec![msg.reply(kernel_info())],
        "is_complete_request" => {
            let code = msg.content["code"].as_str().unwrap_or("");
            vec![msg.reply(crate::analysis::is_complete(code))]
        }
        "history_request" => {
            let history = shared.history.lock().unwrap();
            vec![msg.reply(crate::history::reply(&history, &msg.content))]
        }
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
    if status {
        iopub
            .send(msg.child("status", json!({"execution_state": "idle"})))
            .ok();
    }
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
    parent: Option<Message>,
    /// The running request is `silent`: its output is not published.
    silent: bool,
    panics: Vec<(String, String)>,
}

impl Pump {
    /// Publishes pieces of one stream (stdout pieces may be display or panic frames).
    fn handle(&mut self, iopub: &Iopub, stream: &str, pieces: Vec<String>) {
        let mut events: Vec<Event> = Vec::new();
        for piece in pieces {
            let ev = if stream == "stdout" {
                parse_piece(piece)
            } else {
                Event::Text(piece)
            };
            // Consecutive text goes out as one stream message.
            match (events.last_mut(), ev) {
                (Some(Event::Text(t)), Event::Text(more)) => t.push_str(&more),
                (_, ev) => events.push(ev),
            }
        }
        for ev in events {
            let msg = match ev {
                Event::Panic { message, location } => {
                    self.panics.push((message, location));
                    continue;
                }
                _ if self.silent => continue,
                Event::Text(text) => {
                    let Some(parent) = &self.parent else { continue };
                    parent.child("stream", json!({"name": stream, "text": text}))
                }
                Event::Display {
                    data,
                    display_id,
                    update,
                } => {
                    let Some(parent) = &self.parent else { continue };
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
            };
            iopub.send(msg).ok();
        }
    }
}

fn drain(rx: &crossbeam_channel::Receiver<String>) -> Vec<String> {
    let mut pieces = Vec::new();
    while let Ok(p) = rx.try_recv() {
        pieces.push(p);
    }
    pieces
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
        // Let a burst of pieces arrive so they go out as one message.
        std::thread::sleep(Duration::from_millis(2));
        let mut p = pump.lock().unwrap();
        let (name, rx) = if index == 0 {
            ("stdout", &stdout)
        } else {
            ("stderr", &stderr)
        };
        let pieces = drain(rx);
        if pieces.is_empty() && rx.is_empty() {
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
        p.handle(&iopub, name, pieces);
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
    /// After a failed cell with `stop_on_error`: execute requests queued up to this sequence
    /// number are aborted.
    abort_through: u64,
}

/// How a cell ended, for the reply.
enum Outcome {
    Ok,
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
        /// Further diagnostics (compile errors), published after this one.
        more: Vec<(String, Vec<String>)>,
    },
}

impl Evaluator {
    fn spawn(shared: Arc<Shared>) -> std::sync::mpsc::Sender<Job> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut ev = Evaluator::start(shared);
            while let Ok(job) = rx.recv() {
                ev.run_job(job);
            }
        });
        tx
    }

    fn run_job(&mut self, Job { msg, seq }: Job) {
        let shared = self.shared.clone();
        shared.evaluator_busy.store(true, Ordering::SeqCst);
        shared
            .iopub
            .send(msg.child("status", json!({"execution_state": "busy"})))
            .ok();
        let reply = match msg.msg_type() {
            "execute_request" if seq <= self.abort_through => {
                msg.reply(json!({"status": "aborted", "execution_count": self.execution_count}))
            }
            "execute_request" => {
                let reply = self.execute(&msg);
                let failed = reply.content["status"] == "error";
                let stop = msg.content["stop_on_error"].as_bool().unwrap_or(true);
                if failed && stop {
                    self.abort_through = shared.queued.load(Ordering::SeqCst);
                }
                reply
            }
            "complete_request" => self.complete(&msg),
            _ => self.inspect(&msg),
        };
        shared.replies.send(reply).ok();
        shared
            .iopub
            .send(msg.child("status", json!({"execution_state": "idle"})))
            .ok();
        shared.evaluator_busy.store(false, Ordering::SeqCst);
    }

    fn start(shared: Arc<Shared>) -> Evaluator {
        let pump = Arc::new(Mutex::new(Pump {
            parent: None,
            silent: false,
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
            abort_through: 0,
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

    /// Waits until every piece printed so far has been published, then runs `f` under the
    /// pump lock.
    fn with_pump_drained<T>(&self, f: impl FnOnce(&mut Pump) -> T) -> T {
        let mut p = self.pump.lock().unwrap();
        for (name, rx) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if let Some(rx) = rx {
                let pieces = drain(rx);
                if !pieces.is_empty() {
                    p.handle(&self.shared.iopub, name, pieces);
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
            self.shared
                .history
                .lock()
                .unwrap()
                .push((self.execution_count, code.clone()));
        }
        let count = self.execution_count;
        let iopub = self.shared.iopub.clone();
        let publish = |m: Message| {
            if !silent {
                iopub.send(m).ok();
            }
        };
        publish(msg.child(
            "execute_input",
            json!({"code": code, "execution_count": count}),
        ));
        let finish = |outcome: Outcome| -> Message {
            match outcome {
                Outcome::Ok => msg.reply(json!({"status": "ok", "execution_count": count, "user_expressions": {}, "payload": []})),
                Outcome::Error { ename, evalue, traceback, more } => {
                    publish(msg.child(
                        "error",
                        json!({"ename": ename, "evalue": evalue, "traceback": traceback}),
                    ));
                    for (evalue, traceback) in more {
                        publish(msg.child(
                            "error",
                            json!({"ename": ename, "evalue": evalue, "traceback": traceback}),
                        ));
                    }
                    msg.reply(json!({"status": "error", "execution_count": count, "ename": ename, "evalue": evalue, "traceback": traceback}))
                }
            }
        };
        if let Some(e) = &self.startup_error {
            return finish(Outcome::Error {
                more: Vec::new(),
                ename: "KernelStartupError".into(),
                evalue: e.clone(),
                traceback: e.lines().map(str::to_string).collect(),
            });
        }
        let Some(ctx) = self.ctx.as_mut() else {
            unreachable!()
        };

        let _ = std::fs::remove_file(&self.shared.session.interrupt_file);
        self.shared.interrupts.store(0, Ordering::SeqCst);
        {
            let mut p = self.pump.lock().unwrap();
            p.parent = Some(msg.clone());
            p.silent = silent;
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
        let panics = self.with_pump_drained(|p| std::mem::take(&mut p.panics));
        let Some(ctx) = self.ctx.as_ref() else {
            unreachable!()
        };

        let outcome = match result {
            Ok(output) => {
                if let Some((message, location)) = panics.first() {
                    let location = cell_location(ctx, location);
                    Outcome::Error {
                        more: Vec::new(),
                        ename: "panic".into(),
                        evalue: message.clone(),
                        traceback: vec![
                            format!("thread panicked at {location}:"),
                            message.clone(),
                            "(variables defined before this cell are kept)".to_string(),
                        ],
                    }
                } else if let Some(error) = output.user_error {
                    let ename = short_type_name(&error.type_name);
                    let mut traceback: Vec<String> = format!("{ename}: {}", error.message)
                        .lines()
                        .map(str::to_string)
                        .collect();
                    if !error.final_value {
                        traceback.push(
                            "(the cell returned early at `?`: variables it defined are not kept)"
                                .to_string(),
                        );
                    }
                    Outcome::Error {
                        more: Vec::new(),
                        ename,
                        evalue: error.message,
                        traceback,
                    }
                } else {
                    if !output.content_by_mime_type.is_empty() {
                        let mut data = Map::new();
                        for (mime, content) in output.content_by_mime_type {
                            let v = if mime.ends_with("json") {
                                serde_json::from_str(&content).unwrap_or(Value::String(content))
                            } else {
                                Value::String(content)
                            };
                            data.insert(mime, v);
                        }
                        publish(msg.child(
                            "execute_result",
                            json!({"execution_count": count, "data": data, "metadata": {}}),
                        ));
                    }
                    Outcome::Ok
                }
            }
            Err(evcxr::Error::CompilationErrors(errors)) => {
                // One `error` message per diagnostic; the reply carries the first.
                let mut reports = compile_error_reports(&errors, &code, count).into_iter();
                let (evalue, traceback) = reports.next().unwrap_or_default();
                Outcome::Error {
                    ename: "CompilationError".into(),
                    evalue,
                    traceback,
                    more: reports.collect(),
                }
            }
            Err(evcxr::Error::SubprocessTerminated(why)) => {
                let text = if self.shared.interrupts.load(Ordering::SeqCst) > 1 {
                    "Interrupted twice: the evaluation process was killed and restarted; variables were lost.".to_string()
                } else {
                    format!(
                        "The evaluation process died ({}); it was restarted and variables were lost.",
                        why.trim()
                    )
                };
                Outcome::Error {
                    more: Vec::new(),
                    ename: "ProcessTerminated".into(),
                    evalue: text.clone(),
                    traceback: vec![text],
                }
            }
            Err(e) => {
                let text = render_error(&e);
                Outcome::Error {
                    more: Vec::new(),
                    ename: "Error".into(),
                    evalue: text.clone(),
                    traceback: text.lines().map(str::to_string).collect(),
                }
            }
        };
        // The note belongs to a cell that stopped at its check and ended normally; a failed
        // cell's error says what happened.
        if interrupted && matches!(outcome, Outcome::Ok) {
            publish(msg.child("stream", json!({"name": "stderr", "text": "[interrupted: the cell stopped at its next check; variables are kept]\n"})));
        }
        let reply = finish(outcome);
        {
            let mut p = self.pump.lock().unwrap();
            p.parent = None;
            p.silent = false;
        }
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

/// `anyhow::Error` -> `Error`, `core::num::error::ParseIntError` -> `ParseIntError`: the last
/// path segment of the type (generic arguments dropped), or "Error".
fn short_type_name(type_name: &str) -> String {
    let base = type_name.split('<').next().unwrap_or("");
    let name = base.rsplit("::").next().unwrap_or("").trim();
    if name.is_empty() {
        "Error".to_string()
    } else {
        name.to_string()
    }
}

/// A panic location in the cell's terms: `cell line N` when it is in the code evcxr generated
/// from the cell (`src/lib.rs` of its crate), else as reported (library code).
fn cell_location(ctx: &evcxr::CommandContext, location: &str) -> String {
    let mut parts = location.rsplitn(3, ':');
    let (_column, line, file) = (parts.next(), parts.next(), parts.next());
    if file == Some("src/lib.rs") {
        return match line
            .and_then(|l| l.parse::<usize>().ok())
            .and_then(|l| ctx.cell_line(l))
        {
            Some(line) => format!("cell line {line}"),
            None => "code evcxr generated for the cell".to_string(),
        };
    }
    location.to_string()
}

/// One (evalue, traceback) per diagnostic, in the cell's terms: rustc's diagnostic mapped onto
/// the cell's lines when its span is in the user's code. When no diagnostic points into the
/// cell (their spans are all in the code evcxr generates around it, as for `let a = std::`,
/// which runs into evcxr's next line), the cell's syntax errors from rust-analyzer's parser are
/// reported instead if it has any, else each diagnostic's message and help without the
/// generated code.
fn compile_error_reports(
    errors: &[evcxr::CompilationError],
    source: &str,
    count: u64,
) -> Vec<(String, Vec<String>)> {
    if !errors.iter().any(|e| e.is_from_user_code()) {
        let syntax = crate::analysis::syntax_errors(source);
        if !syntax.is_empty() {
            return syntax
                .into_iter()
                .map(|e| {
                    (
                        format!("syntax error at {e}"),
                        vec![format!("syntax error in cell[{count}] at {e}")],
                    )
                })
                .collect();
        }
    }
    errors
        .iter()
        .map(|e| (e.message(), compile_error_traceback(e, source, count)))
        .collect()
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
    // Not in the cell's code: rustc's rendering would quote evcxr's generated code.
    let mut tb = vec![format!("error: {}", error.message())];
    tb.extend(error.help().into_iter().map(|h| format!("help: {h}")));
    tb
}
