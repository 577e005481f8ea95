defmodule Sidecar.OsProcess do
  @moduledoc """
  Questions about OS processes, answered from `/proc` (Linux), and signals: is a pid alive, when did it start,
  and does a file named after its owner pid still have that owner (the dead-owner sweeps of
  `Sidecar.Shm` and `Sidecar.WorkerLog`, like the Python side's `sidecar.dataplane.reaper`).
  """

  # A file is only ever made by a process that already runs, so an owner that started after the
  # file changed is a newer process that reuses the pid. ctime is in whole seconds and /proc/stat's
  # btime too: 2 s of slack keep a live owner from ever looking newer than its file.
  @start_slack_s 2

  @doc "True while OS process `pid` exists and is not a zombie."
  @spec alive?(non_neg_integer) :: boolean
  def alive?(pid) do
    case stat_fields(pid) do
      {:ok, [state | _]} -> state != "Z"
      :error -> false
    end
  end

  @doc """
  True when `pid` is alive and started no later than `since` (a Unix time in seconds, e.g. the
  ctime of a file named after it); false when it is gone or is a newer process reusing the pid.
  """
  @spec owner_alive?(non_neg_integer, integer) :: boolean
  def owner_alive?(pid, since) do
    alive?(pid) and
      case started_at(pid) do
        {:ok, started} -> started <= since + @start_slack_s
        # Unknown start time: alive, never remove by guess.
        :error -> true
      end
  end

  @doc """
  True when `pid`, named as the owner of `file`, is alive and older than the file's last change;
  also true when the file is gone already (nothing to remove).
  """
  @spec file_owner_alive?(non_neg_integer, Path.t()) :: boolean
  def file_owner_alive?(pid, file) do
    case File.stat(file, time: :posix) do
      {:ok, %{ctime: ctime}} -> owner_alive?(pid, ctime)
      {:error, _} -> true
    end
  end

  @doc "Sends SIGTERM or SIGKILL to OS process `pid` (nothing when it is gone)."
  @spec signal(non_neg_integer, :term | :kill) :: :ok
  def signal(pid, sig) when is_integer(pid) and pid > 0 and sig in [:term, :kill] do
    flag = if sig == :term, do: "-TERM", else: "-KILL"
    _ = System.cmd("kill", [flag, Integer.to_string(pid)], stderr_to_stdout: true)
    :ok
  end

  @doc "When `pid` started, in Unix seconds (boot time plus its start tick)."
  @spec started_at(non_neg_integer) :: {:ok, float} | :error
  def started_at(pid) do
    with {:ok, fields} <- stat_fields(pid),
         # starttime is field 22 of /proc/<pid>/stat; the list starts at field 3 (the state).
         {ticks, ""} <- Integer.parse(Enum.at(fields, 19, "")),
         {:ok, boot} <- boot_time() do
      {:ok, boot + ticks / clock_ticks()}
    else
      _ -> :error
    end
  end

  @doc """
  CPU time `pid` has used (user + system, all its threads), in seconds; `:error` when it is gone.
  The kernel keeps it without the process's help: a worker whose Python holds the GIL in C still
  advances it (`Sidecar.Worker` tells busy from hung with it).
  """
  @spec cpu_seconds(non_neg_integer) :: {:ok, float} | :error
  def cpu_seconds(pid) do
    # utime and stime are fields 14 and 15 of /proc/<pid>/stat; the list starts at field 3.
    with {:ok, fields} <- stat_fields(pid),
         {utime, ""} <- Integer.parse(Enum.at(fields, 11, "")),
         {stime, ""} <- Integer.parse(Enum.at(fields, 12, "")) do
      {:ok, (utime + stime) / clock_ticks()}
    else
      _ -> :error
    end
  end

  # The fields of /proc/<pid>/stat after "pid (comm)": comm may contain spaces and ')', so split
  # after the last ')'.
  defp stat_fields(pid) do
    with {:ok, stat} <- File.read("/proc/#{pid}/stat"),
         [_, rest] <- Regex.run(~r/\A.*\)\s+(.*)\z/s, stat) do
      {:ok, String.split(rest)}
    else
      _ -> :error
    end
  end

  defp boot_time do
    with {:ok, text} <- File.read("/proc/stat"),
         [_, btime] <- Regex.run(~r/^btime\s+(\d+)$/m, text) do
      {:ok, String.to_integer(btime)}
    else
      _ -> :error
    end
  end

  # USER_HZ, the unit of /proc's tick counts: 100 on every common Linux, asked once to be sure.
  defp clock_ticks do
    with nil <- :persistent_term.get({__MODULE__, :clock_ticks}, nil) do
      hz = ask_clock_ticks()
      :persistent_term.put({__MODULE__, :clock_ticks}, hz)
      hz
    end
  end

  defp ask_clock_ticks do
    case System.cmd("getconf", ["CLK_TCK"], stderr_to_stdout: true) do
      {out, 0} -> String.to_integer(String.trim(out))
      _ -> 100
    end
  rescue
    # no getconf on the PATH, or an answer that is not a number
    _ -> 100
  end
end
