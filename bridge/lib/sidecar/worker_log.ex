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
  @name_re ~r/^sidecar-bridge-[A-Za-z0-9]{1,32}-([0-9]{1,10})-.*\.log$/

  @doc "A fresh log path for a worker of `pool` in `slot` (the file is not created here)."
  @spec new_path(atom, non_neg_integer) :: Path.t()
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
          {:ok, data} -> data |> String.split("\n", trim: true) |> Enum.take(-n)
          _ -> []
        end
      after
        File.close(fd)
      end
    else
      _ -> []
    end
  end

  @doc "Removes the logs of VMs that are dead (or whose pid a newer process reuses); returns how many."
  @spec sweep_dead_owners() :: non_neg_integer
  def sweep_dead_owners do
    Enum.count(files(), fn file ->
      case Regex.run(@name_re, Path.basename(file)) do
        [_, pid] -> not OsProcess.file_owner_alive?(String.to_integer(pid), file) and File.rm(file) == :ok
        _ -> false
      end
    end)
  end

  @doc "Removes every log of this VM (at VM exit: no worker of it will write again)."
  @spec remove_vm_logs() :: :ok
  def remove_vm_logs do
    for file <- files(), String.starts_with?(Path.basename(file), vm_prefix()), do: File.rm(file)
    :ok
  end

  defp vm_prefix, do: "sidecar-bridge-#{Shm.run_id()}-#{Shm.os_pid()}-"

  defp files do
    dir = System.tmp_dir!()

    case File.ls(dir) do
      {:ok, names} ->
        for name <- names, String.starts_with?(name, "sidecar-bridge-"), do: Path.join(dir, name)

      _ ->
        []
    end
  end
end
