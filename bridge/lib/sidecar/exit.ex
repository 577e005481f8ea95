defmodule Sidecar.Exit do
  @moduledoc """
  Classifies how a worker process ended, with the same names as the Python pool
  (`sidecar.host.crash.Classification`).

  A port reports `{:exit_status, n}`: `n` is the exit code, or 128 + the signal number when a signal
  killed the process. 0 is clean, 1 an uncaught Python exception, 70 "tainted" (the worker asks for a
  fresh process), 139 a segfault (SIGSEGV), 134 an abort (SIGABRT), 137 SIGKILL (most often the
  kernel's OOM killer), and so on.
  """

  @signals %{
    1 => :terminated,
    2 => :terminated,
    4 => :illegal_instruction,
    6 => :abort,
    7 => :bus_error,
    8 => :fpe,
    9 => :killed_oom,
    11 => :segfault,
    15 => :terminated
  }

  @signal_names %{
    1 => "SIGHUP",
    2 => "SIGINT",
    4 => "SIGILL",
    6 => "SIGABRT",
    7 => "SIGBUS",
    8 => "SIGFPE",
    9 => "SIGKILL",
    11 => "SIGSEGV",
    15 => "SIGTERM"
  }

  @describe %{
    clean: "exited cleanly",
    python_error: "exited with an uncaught Python exception",
    segfault: "crashed with a segmentation fault (invalid memory access in native code)",
    abort: "aborted (abort() or a failed assertion in native code)",
    fpe: "crashed with a floating-point/arithmetic exception",
    bus_error: "crashed with a bus error (a mapping was truncated or misaligned)",
    illegal_instruction: "executed an illegal instruction (CPU feature mismatch?)",
    killed_oom: "was killed by SIGKILL (likely out of memory)",
    terminated: "was terminated by a signal",
    tainted: "exited 70: its device state is tainted and needs a fresh process",
    other: "exited abnormally",
    start_timeout: "was killed by the pool: it did not report ready in time",
    spawn_failed: "could not be started"
  }

  @type classification ::
          :clean
          | :python_error
          | :segfault
          | :abort
          | :fpe
          | :bus_error
          | :illegal_instruction
          | :killed_oom
          | :terminated
          | :tainted
          | :other
          | :start_timeout
          | :spawn_failed
  @type t :: %{classification: classification, exit_code: integer | nil, signal: integer | nil}

  @doc "Classifies a port exit status."
  @spec classify(non_neg_integer) :: t
  def classify(0), do: %{classification: :clean, exit_code: 0, signal: nil}
  def classify(1), do: %{classification: :python_error, exit_code: 1, signal: nil}
  def classify(70), do: %{classification: :tainted, exit_code: 70, signal: nil}

  def classify(status) when is_integer(status) and status > 128 and is_map_key(@signals, status - 128) do
    sig = status - 128
    %{classification: Map.fetch!(@signals, sig), exit_code: status, signal: sig}
  end

  def classify(status) when is_integer(status) and status > 128,
    do: %{classification: :other, exit_code: status, signal: status - 128}

  def classify(status) when is_integer(status), do: %{classification: :other, exit_code: status, signal: nil}

  @doc "A sentence for logs and error messages."
  @spec describe(t) :: String.t()
  def describe(%{classification: c} = info) do
    text = Map.get(@describe, c, "exited")

    cond do
      c == :killed_oom -> text
      is_integer(info[:signal]) -> "#{text} (#{Map.get(@signal_names, info.signal, "signal #{info.signal}")})"
      c in [:other, :python_error] -> "#{text} (exit code #{info.exit_code})"
      true -> text
    end
  end
end
