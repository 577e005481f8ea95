defmodule Sidecar.WorkerLog do
  @moduledoc """
  The files that capture a worker's stderr (`stderr: :capture`), so that a crash error can quote its
  last lines.

  One file per worker process, in `System.tmp_dir!/0`:
  `sidecar-bridge-<run>-<VM os pid>-<pool>-<slot>-<random hex>.log`. It is created by the shell
  that execs the worker, with umask 077 (mode 0600 from its creation, never chmodded later) and
  noclobber (an existing path, e.g. a planted symlink, is refused rather than followed). The worker
  removes it when it stops; `Sidecar.Cleanup` removes the VM's own at VM exit; a new pool removes
  those of dead VMs (`sweep_dead_owners/0`).
  """

  alias Sidecar.{OsProcess, Shm}

  @tail_bytes 16_384
  # Logs, and the template's socket directory (made by the template: `<prefix>t-<random>`).
  @name_re ~r/^sidecar-bridge-[A-Za-z0-9]{1,32}-([0-9]{1,10})-(.*\.log|t-[A-Za-z0-9_]+)$/

  @doc "A fresh log path for a worker of `pool` in `slot` (or `\"template\"`); the file is not created here."
  @spec new_path(atom, non_neg_integer | String.t()) :: Path.t()
  def new_path(pool, slot) do
    # Pool names are atoms: keep the readable part, never a path separator.
    safe_pool = String.replace(to_string(pool), ~r/[^A-Za-z0-9_.]/, "_")
    hex = Base.encode16(:rand.bytes(6), case: :lower)
    Path.join(System.tmp_dir!(), "#{vm_prefix()}#{safe_pool}-#{slot}-#{hex}.log")
  end

  @doc """
  `{executable, args}` running `command` (a list: the program and its arguments) with its stderr in
  the new file `path`. `exec` replaces the shell, so the port's OS process IS the worker (same pid,
  same exit status); the umask is back to the VM's before the worker starts.
  """
  @spec wrap(Path.t(), [String.t()]) :: {String.t(), [String.t()]}
  def wrap(path, command) do
    script = ~S"""
    f=$1; shift
    mask=$(umask)
    umask 077
    set -C
    exec 2>"$f"
    umask "$mask"
    exec "$@"
    """

    {System.find_executable("sh") || "/bin/sh", ["-c", script, "sidecar-worker", path | command]}
  end

  @doc "The last `n` lines of a log (at most its last #{@tail_bytes} bytes); `[]` when unreadable."
  @spec tail(Path.t() | nil, non_neg_integer) :: [String.t()]
  def tail(nil, _n), do: []

  def tail(path, n) do
    with {:ok, fd} <- File.open(path, [:read, :raw, :binary]) do
      try do
        size = File.stat!(path).size
        start = max(size - @tail_bytes, 0)

        case :file.pread(fd, start, size - start) do
          {:ok, data} -> data |> String.split("\n", trim: true) |> condense(n)
          _ -> []
        end
      after
        File.close(fd)
      end
    else
      _ -> []
    end
  end

  @doc """
  At most `n` lines that explain a worker's end: normally its last `n` lines. After a native crash
  faulthandler dumps every thread, which would push everything useful out; then: the lines before
  the crash, the fatal line and the crashing thread's stack. Like `sidecar.host.crash.condense_tail`.
  """
  @spec condense([String.t()], non_neg_integer) :: [String.t()]
  def condense(lines, n) do
    case fatal_block(lines) do
      nil ->
        Enum.take(lines, -n)

      {before, block} ->
        block = Enum.take(block, n)
        room = n - length(block)
        if(room > 0, do: Enum.take(before, -room), else: []) ++ block
    end
  end

  # faulthandler's report: {the lines before "Fatal Python error", that line + the current thread's stack}.
  defp fatal_block(lines) do
    case Enum.find_index(Enum.reverse(lines), &String.starts_with?(&1, "Fatal Python error")) do
      nil ->
        nil

      back ->
        {before, [fatal | rest]} = Enum.split(lines, length(lines) - 1 - back)

        stack =
          case Enum.drop_while(rest, &(not String.starts_with?(&1, "Current thread"))) do
            [current | frames] -> [current | Enum.take_while(frames, &String.starts_with?(&1, "  "))]
            [] -> []
          end

        {before, [fatal | stack]}
    end
  end

  @doc """
  The most telling line of a dead worker's stderr, for an error message: a fatal error with the
  frame that crashed (faulthandler's report), else the last line that is not routine (the
  exception line of a traceback, an error record); nil when there is none. Like
  `sidecar.host.crash.summarize_tail`.
  """
  @spec summarize([String.t()]) :: String.t() | nil
  def summarize(tail) do
    lines = tail |> Enum.map(&String.trim_trailing/1) |> Enum.reject(&(String.trim(&1) == ""))

    case fatal_block(lines) do
      nil ->
        lines |> Enum.reject(&routine?/1) |> List.last() |> trim()

      {_, [fatal | stack]} ->
        frame = Enum.find(stack, &String.starts_with?(String.trim(&1), "File "))
        if frame, do: "#{fatal} (#{String.trim(frame)})", else: fatal
    end
  end

  # Lines that never explain an end: the worker's own info/debug log records, the launcher's note
  # of the worker's pid, faulthandler's list of extension modules.
  defp routine?(line) do
    String.starts_with?(line, ["Extension modules:", "sidecar_launch: worker pid "]) or
      Regex.match?(~r/^\S+ \S+ sidecar\[\d+\] (INFO|DEBUG) /, line)
  end

  defp trim(nil), do: nil
  defp trim(line), do: String.trim(line)

  @doc """
  Removes the logs (and template socket directories) of VMs that are dead, or whose pid a newer
  process reuses; returns how many.
  """
  @spec sweep_dead_owners() :: non_neg_integer
  def sweep_dead_owners do
    Enum.count(files(), fn file ->
      case Regex.run(@name_re, Path.basename(file)) do
        [_, pid | _] -> not OsProcess.file_owner_alive?(String.to_integer(pid), file) and remove(file)
        _ -> false
      end
    end)
  end

  @doc "Removes every log and template directory of this VM (at VM exit: none of its workers writes again)."
  @spec remove_vm_logs() :: :ok
  def remove_vm_logs do
    for file <- files(), String.starts_with?(Path.basename(file), vm_prefix()), do: remove(file)
    :ok
  end

  @doc "The prefix of the template's socket directory for this VM (the template adds `t-<random>`)."
  @spec template_dir_prefix() :: String.t()
  def template_dir_prefix, do: vm_prefix() <> "t-"

  defp vm_prefix, do: "sidecar-bridge-#{Shm.run_id()}-#{Shm.os_pid()}-"

  defp remove(path), do: match?({:ok, [_ | _]}, File.rm_rf(path))

  # $TMPDIR, and /tmp where the template puts its directory when $TMPDIR is too long for a socket.
  defp files do
    for dir <- Enum.uniq([System.tmp_dir!(), "/tmp"]),
        {:ok, names} <- [File.ls(dir)],
        name <- names,
        String.starts_with?(name, "sidecar-bridge-"),
        do: Path.join(dir, name)
  end
end
