defmodule Sidecar.Exit do
  @moduledoc """
  Classifies how a worker process ended, with the names of the Python pool
  (`sidecar.host.crash.Classification`), and says whether the work can have caused it.

  A port reports `{:exit_status, n}`: `n` is the exit code, or 128 + the signal number when a signal
  killed the process. 0 is clean, 1 an uncaught Python exception, 70 "tainted" (the worker asks for a
  fresh process), 139 a segfault (SIGSEGV), 134 an abort (SIGABRT), and so on.

  SIGKILL is `:killed` (someone killed the worker: an operator, a supervisor, a test) unless the
  kernel's OOM killer is confirmed: the memory cgroup's `oom_kill` counter moved while the worker
  lived (`oom_kills/0` sampled at its start), then it is `:killed_oom`. SIGTERM, SIGINT and SIGHUP
  are `:terminated`.

  `caused_by_work?/1`: only the endings a call (or a start-up) can cause count against the calls in
  flight (the poison-call guard) and open the circuit breaker: a native crash (segfault, abort,
  fpe, bus error, illegal instruction), a confirmed OOM, a taint, an uncaught Python exception, an
  unknown exit code, a start that failed or timed out, a worker that stopped answering. An external
  SIGKILL or SIGTERM of a worker says nothing about the work.
  """

  @signals %{
    1 => :terminated,
    2 => :terminated,
    4 => :illegal_instruction,
    6 => :abort,
    7 => :bus_error,
    8 => :fpe,
    9 => :killed,
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
    killed: "was killed by SIGKILL from outside (no OOM kill counted by its cgroup)",
    killed_oom: "was killed by the kernel's OOM killer (SIGKILL; the cgroup counted an oom_kill)",
    terminated: "was terminated by a signal",
    tainted: "exited 70: its device state is tainted and needs a fresh process",
    other: "exited abnormally",
    start_timeout: "was killed by the pool: it did not report ready in time",
    unresponsive: "was killed by the pool: it stopped answering health checks",
    spawn_failed: "could not be started",
    restore_failed: "was killed by the pool: it could not restore the pool's resources"
  }

  @caused ~w(python_error segfault abort fpe bus_error illegal_instruction killed_oom tainted other
             start_timeout unresponsive spawn_failed restore_failed)a

  @type classification ::
          :clean
          | :python_error
          | :segfault
          | :abort
          | :fpe
          | :bus_error
          | :illegal_instruction
          | :killed
          | :killed_oom
          | :terminated
          | :tainted
          | :other
          | :start_timeout
          | :unresponsive
          | :spawn_failed
          | :restore_failed
  @type t :: %{classification: classification, exit_code: integer | nil, signal: integer | nil}

  @doc "Every classification name."
  @spec classifications() :: [classification]
  def classifications, do: Map.keys(@describe)

  @doc """
  Classifies a port exit status. `oom_confirmed` (the cgroup counted an OOM kill while the worker
  lived) turns a SIGKILL into `:killed_oom`.
  """
  @spec classify(non_neg_integer, boolean) :: t
  def classify(status, oom_confirmed \\ false)
  def classify(0, _), do: %{classification: :clean, exit_code: 0, signal: nil}
  def classify(1, _), do: %{classification: :python_error, exit_code: 1, signal: nil}
  def classify(70, _), do: %{classification: :tainted, exit_code: 70, signal: nil}
  def classify(137, true), do: %{classification: :killed_oom, exit_code: 137, signal: 9}

  def classify(status, _) when is_integer(status) and status > 128 and is_map_key(@signals, status - 128) do
    sig = status - 128
    %{classification: Map.fetch!(@signals, sig), exit_code: status, signal: sig}
  end

  def classify(status, _) when is_integer(status) and status > 128,
    do: %{classification: :other, exit_code: status, signal: status - 128}

  def classify(status, _) when is_integer(status), do: %{classification: :other, exit_code: status, signal: nil}

  @doc "Can the work (a call in flight, or the start-up) have caused an ending of this class?"
  @spec caused_by_work?(classification | t) :: boolean
  def caused_by_work?(%{classification: c}), do: caused_by_work?(c)
  def caused_by_work?(c), do: c in @caused

  @doc "A sentence for logs and error messages."
  @spec describe(t) :: String.t()
  def describe(%{classification: c} = info) do
    text = Map.get(@describe, c, "exited")

    cond do
      c in [:killed, :killed_oom] -> text
      is_integer(info[:signal]) -> "#{text} (#{Map.get(@signal_names, info.signal, "signal #{info.signal}")})"
      c in [:other, :python_error] -> "#{text} (exit code #{info.exit_code})"
      true -> text
    end
  end

  @doc """
  The `oom_kill` counter of this VM's memory cgroup (v2 `memory.events`, v1 `memory.oom_control`;
  workers run in the VM's cgroup), or nil where there is none to read.
  """
  @spec oom_kills() :: non_neg_integer | nil
  def oom_kills do
    Enum.find_value(counter_files(), fn file ->
      with {:ok, text} <- File.read(file),
           [_, n] <- Regex.run(~r/^oom_kill (\d+)$/m, text) do
        String.to_integer(n)
      else
        _ -> nil
      end
    end)
  end

  @cgroup_root "/sys/fs/cgroup"

  defp counter_files do
    case File.read("/proc/self/cgroup") do
      {:ok, text} ->
        for line <- String.split(text, "\n", trim: true),
            [_, controllers, rel] <- [String.split(line, ":", parts: 3)],
            rel = String.trim_leading(String.trim(rel), "/"),
            file <- cgroup_files(controllers, rel),
            do: file

      _ ->
        []
    end
  end

  defp cgroup_files("", rel),
    do: [Path.join([@cgroup_root, rel, "memory.events"]), Path.join([@cgroup_root, "unified", rel, "memory.events"])]

  defp cgroup_files(controllers, rel) do
    if "memory" in String.split(controllers, ","),
      do: [Path.join([@cgroup_root, "memory", rel, "memory.oom_control"])],
      else: []
  end
end
