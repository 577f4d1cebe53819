/**
 * The frames of the groundloop wire protocol v1 (docs/protocol.md), as TypeScript types.
 *
 * Types only: this file compiles to nothing, so the built client stays one ES module.
 * The protocol is extended without breaking, so every frame may carry fields not listed here.
 */

export type RequestId = string | number;

/** A MIME bundle: `text/plain`, `text/html`, `image/png` (base64), `application/json` ... */
export type MimeBundle = Record<string, unknown>;

export interface ErrorInfo {
  name: string;
  message: string;
  traceback?: string;
}

export interface SandboxInfo {
  backend: string;
  runtime: string;
  image: string;
  warm: boolean;
  /** How the server reaches the sandbox: "socket", "attach" or "stdio" (docs/protocol.md); informational. */
  channel?: string;
}

export interface Limits {
  max_message_bytes: number;
  max_output_bytes: number;
  exec_timeout_s: number;
  max_exec_timeout_s: number;
  max_file_bytes: number;
  line_max_bytes: number;
  max_inflight: number;
  resume_grace_s: number;
  idle_timeout_s: number;
  replay_frames: number;
  max_iterations: number;
  [extra: string]: unknown;
}

interface Base {
  seq: number;
  [extra: string]: unknown;
}

export interface ReadyFrame extends Base {
  type: "ready";
  session_id: string;
  resumed: boolean;
  sandbox: SandboxInfo;
  limits: Limits;
  protocol: string;
}

export interface OutputFrame extends Base {
  type: "stdout" | "stderr";
  id: RequestId;
  text: string;
  process_id?: string;
  iteration?: number;
  block?: number;
}

export interface ResultFrame extends Base {
  type: "result";
  id: RequestId;
  data: MimeBundle;
  main: boolean;
  /** A display that later results may replace (docs/protocol.md section 12). */
  display_id?: string;
  /** This result replaces the ones shown for `display_id`. */
  update?: boolean;
  iteration?: number;
  block?: number;
}

/** The code called `clear_output()`: what the request showed so far is to go (with `wait`: at its next output). */
export interface ClearOutputFrame extends Base {
  type: "clear_output";
  id: RequestId;
  wait: boolean;
  iteration?: number;
  block?: number;
}

export interface DoneFrame extends Base {
  type: "done";
  id: RequestId;
  ok: boolean;
  duration_ms: number;
  error?: ErrorInfo | null;
  truncated?: boolean;
  /** Set by this client when the request ended without a server `done` (session lost, cancelled before sending). */
  local?: boolean;
}

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "rate_limited"
  | "too_large"
  | "busy"
  | "sandbox_unavailable"
  | "draining"
  | "llm_unavailable"
  | "internal";

export interface ErrorFrame extends Base {
  type: "error";
  code: ErrorCode | string;
  message: string;
  id?: RequestId;
}

export interface PongFrame extends Base {
  type: "pong";
  id: RequestId;
}

export interface ExitFrame extends Base {
  type: "exit";
  id: RequestId;
  process_id: string;
  exit_code: number | null;
}

export interface TokenFrame extends Base {
  type: "token";
  id: RequestId;
  text: string;
  iteration: number;
}

export interface CodeFrame extends Base {
  type: "code";
  id: RequestId;
  code: string;
  language: string;
  iteration: number;
  block?: number;
}

export interface AttemptFrame extends Base {
  type: "attempt";
  id: RequestId;
  iteration: number;
  ok: boolean;
  error?: ErrorInfo | string | null;
  duration_ms?: number;
}

export interface GapFrame extends Base {
  type: "gap";
  missed: number;
  first_missed_seq: number;
  last_missed_seq: number;
  message: string;
}

export interface SandboxReplacedFrame extends Base {
  type: "sandbox_replaced";
  session_id: string;
  state_lost: true;
  reason: string;
  sandbox: SandboxInfo;
  message: string;
}

/** The server is shutting down (docs/protocol.md section 10): requests in flight finish, then it closes with 1012. */
export interface DrainingFrame extends Base {
  type: "draining";
  /** Seconds left for the requests in flight; the ones still running then are cancelled. */
  deadline_s: number;
  message: string;
}

export type ServerFrame =
  | ReadyFrame
  | OutputFrame
  | ResultFrame
  | ClearOutputFrame
  | DoneFrame
  | ErrorFrame
  | PongFrame
  | ExitFrame
  | TokenFrame
  | CodeFrame
  | AttemptFrame
  | GapFrame
  | SandboxReplacedFrame
  | DrainingFrame;

/** The frames a request receives, its terminal `done` last. */
export type RequestFrame = OutputFrame | ResultFrame | ClearOutputFrame | DoneFrame | ErrorFrame | PongFrame | ExitFrame | TokenFrame | CodeFrame | AttemptFrame;

export type Language = "python" | "javascript" | "typescript" | "bash";

export interface ContextInfo {
  context_id: string;
  language: string;
  cwd: string;
  runs: number;
  restarts: number;
  alive: boolean;
}

export interface FileEntry {
  name: string;
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  mtime: number;
}

export interface ProcessInfo {
  process_id: string;
  command: string;
  pid: number;
  running: boolean;
  exit_code: number | null;
  started_at: number;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "offline" | "unauthorized" | "closed";

export interface SessionStats {
  /** Frames dropped because their seq was not above the last one processed (a replay overlap). */
  duplicates: number;
  /** Frames whose seq was not exactly the last one + 1 (should stay 0). */
  seqJumps: number;
  resumes: number;
  fresh: number;
  expired: number;
  /** Fresh sessions started because the server drained the previous one (a `draining` frame, then close 1012). */
  drained: number;
  gaps: number;
  frames: number;
}

/* ---- the client's own types (options, results, events) ---------------------------------------------------- */

/** The subset of the WHATWG WebSocket that this client uses (browsers, node >= 22, `ws`). */
export interface WebSocketLike {
  readyState: number;
  binaryType: string;
  protocol: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string[], options?: unknown) => WebSocketLike;

export interface SessionOptions {
  token?: string;
  /** `subprotocol` (default, what browsers can do) or `header` (`Authorization: Bearer`, needs `ws`). */
  auth?: "subprotocol" | "header";
  /** A WebSocket implementation; default the global one, else the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect and resume after a drop (default true); false leaves the session `offline` until `open()`. */
  reconnect?: boolean;
  /** When the server forgot the session (expired, closed): start a fresh one (true) or close (false, default). */
  renewExpired?: boolean;
  /** Backoff of reconnects: doubles from `initialMs` up to `maxMs`, +-20 % jitter. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Send a `ping` this often while open (0: never); each answer is an `rtt` event. */
  pingIntervalMs?: number;
  /** Asked when a fresh connection fails before the upgrade: if it answers, the server refused us (HTTP 401/403). */
  healthUrl?: string | null;
  /** At most this many frames wait in a stream iterator nobody reads (then it fails, nothing is dropped silently). */
  maxBufferedFrames?: number;
}

export interface RequestOptions {
  onFrame?: (frame: RequestFrame) => void;
  /** Aborting cancels the request (a `cancel` frame, or never sending it when still queued). */
  signal?: AbortSignal;
  /** Keep the frames for `for await` iteration over the handle. */
  iterate?: boolean;
}

export interface OutputCallbacks {
  onStdout?: (text: string, frame: OutputFrame) => void;
  onStderr?: (text: string, frame: OutputFrame) => void;
  onResult?: (result: Result, frame: ResultFrame) => void;
  signal?: AbortSignal;
}

export interface Result {
  data: MimeBundle;
  /** The value of the last expression (Jupyter's Out) rather than a display call. */
  main: boolean;
  /** The display's id, when the code gave it one. */
  displayId?: string;
  /** An update of an earlier request's display (`displayId`); an update of this request's own display replaces
   * it in place, unmarked. */
  update?: boolean;
}

/** What a `run_code` gave. Failure of the code is data here (`ok`, `error`), not an exception. */
export interface Execution {
  id: RequestId;
  ok: boolean;
  output: { stdout: string; stderr: string };
  results: Result[];
  error: ErrorInfo | null;
  context?: string;
  truncated: boolean;
  /** A `gap` came while the request was in flight: some of its frames may be lost (never silently). */
  gap: boolean;
  durationMs: number;
  done: DoneFrame;
}

export interface ExecResult extends Omit<Execution, "results" | "context"> {
  exitCode: number | null;
}

export interface AssistResult extends Omit<Execution, "context"> {
  iterations: number;
  code: string;
  /** The model's whole reply, every try's tokens in order. */
  text: string;
  cached: boolean;
  attempts: AttemptFrame[];
  usage?: { input_tokens: number; output_tokens: number };
  timings?: { ttft_ms: number; generation_ms: number; execution_ms: number };
}

export type ProcessFrame = OutputFrame | ExitFrame;

export interface RunCodeOptions extends OutputCallbacks {
  language?: Language;
  context?: string;
  timeoutS?: number;
  /** Environment variables for this run only (over the session's, see `set_env`). */
  env?: Record<string, string>;
  /** Run in a new, clean context of its own, deleted when the run ends (takes no `context`). */
  fresh?: boolean;
}

export interface ExecOptions extends OutputCallbacks {
  cwd?: string;
  env?: Record<string, string>;
  timeoutS?: number;
}

export interface StartProcessOptions {
  cwd?: string;
  env?: Record<string, string>;
  processId?: string;
  onStdout?: (text: string, frame: OutputFrame) => void;
  onStderr?: (text: string, frame: OutputFrame) => void;
}

export interface AssistOptions extends OutputCallbacks {
  language?: Language;
  maxIterations?: number;
  context?: string;
  onToken?: (text: string, frame: TokenFrame) => void;
  onCode?: (frame: CodeFrame) => void;
  onAttempt?: (frame: AttemptFrame) => void;
}

export interface SessionEvents {
  state: { state: ConnectionState; reason: string; delayMs?: number };
  /**
   * `expired`: a fresh session because the server had forgotten the previous one; `drained`: a fresh session because
   * the server drained the previous one (it is shutting down; behind a fleet's proxy this one is on another server).
   */
  ready: { frame: ReadyFrame; fresh: boolean; expired: boolean; drained: boolean };
  /**
   * A frame of no request in flight: `gap`, `sandbox_replaced`, `draining`, an `error` without id, output of a
   * forgotten process.
   */
  frame: { frame: ServerFrame };
  gap: { frame: GapFrame };
  /** The server started draining this session: new requests wait for the next session (also a `frame` event). */
  draining: { frame: DrainingFrame };
  rtt: { ms: number };
}
