defmodule Sidecar.Shm do
  @moduledoc """
  The VM's side of the shared-memory rules.

  Segments are files in `/dev/shm` (a tmpfs: a file there *is* a POSIX shared-memory segment, what
  `shm_open` opens), named `/sc-<run>-<owner os pid>-<random hex>`. The VM creates its own with
  exclusive create and mode 0600, and is the only one that unlinks them; it reads the workers'
  output segments but never unlinks them while their worker lives (when a worker dies, the pool
  unlinks what that worker left).

  `<run>` is one id per VM (`$SIDECAR_RUN_ID` when it is 1-32 letters/digits, random otherwise); every
  pool passes it to its workers, so everything this VM and its workers create shares the prefix
  `sc-<run>-`.

  This process keeps a registry of the VM's segments: each belongs to an owner process (the caller
  of `Sidecar.Tensor.from_binary/4` by default) and optionally to a pool. A segment is unlinked when it
  is freed, when its owner exits, when its pool stops, when the application stops and when the VM
  exits (`Sidecar.Cleanup`). What a VM or worker killed outright leaves is removed by the next pool
  that starts, in any VM (`sweep_dead_owners/0`).
  """
  use GenServer
  require Logger

  alias Sidecar.{Native, OsProcess}

  @dir "/dev/shm"
  @name_re ~r/^\/sc-([A-Za-z0-9]{1,32})-([0-9]{1,10})-([0-9a-f]{8,32})$/
  @run_re ~r/^[A-Za-z0-9]{1,32}$/

  @doc false
  @spec start_link(term) :: GenServer.on_start()
  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @doc "This VM's run id (the `<run>` in segment names)."
  @spec run_id() :: String.t()
  def run_id, do: :persistent_term.get({__MODULE__, :run_id})

  @doc "This VM's OS process id."
  @spec os_pid() :: non_neg_integer
  def os_pid, do: :persistent_term.get({__MODULE__, :os_pid})

  @doc "True when `name` follows `/sc-<run>-<pid>-<hex>`."
  @spec valid_name?(term) :: boolean
  def valid_name?(name), do: is_binary(name) and Regex.match?(@name_re, name)

  @doc "The file behind a segment name."
  @spec path(String.t()) :: String.t()
  def path("/" <> rest), do: Path.join(@dir, rest)

  @doc "The name prefix (`/sc-<run>-<pid>-`) of this run's segments owned by OS process `os_pid`."
  @spec owner_prefix(non_neg_integer) :: String.t()
  def owner_prefix(os_pid), do: "/sc-#{run_id()}-#{os_pid}-"

  @doc "A fresh name owned by this VM."
  @spec new_name() :: String.t()
  def new_name, do: owner_prefix(os_pid()) <> Base.encode16(:rand.bytes(8), case: :lower)

  @doc """
  Creates a segment holding `data` (iodata) or `{:zeros, nbytes}`: exclusive create with mode 0600
  from its first instant, space reserved up front so a full `/dev/shm` is a clean `:out_of_memory`
  error here and never a SIGBUS in the worker. Registers it for `owner` (a pid) and `pool`.

  With the NIF (`Sidecar.Native`) the segment is mapped into the VM and `data` copied into it once
  (on a dirty scheduler when large); the result carries the `mapping`. Without it the file is
  created by a shell with umask 077 (Erlang's file API cannot pass a mode) and written with file
  I/O; `mapping` is nil. Returns `%{name:, nbytes:, inode:, mapping:}`.
  """
  @spec create(iodata | {:zeros, non_neg_integer}, pid, atom | nil) ::
          {:ok, %{name: String.t(), nbytes: non_neg_integer, inode: non_neg_integer, mapping: Native.segment() | nil}}
          | {:error, Sidecar.Error.t()}
  def create(data, owner \\ self(), pool \\ nil) do
    nbytes =
      case data do
        {:zeros, n} -> n
        io -> IO.iodata_length(io)
      end

    if Native.loaded?(), do: create_mapped(data, nbytes, owner, pool, 4), else: create_file(data, nbytes, owner, pool)
  end

  # Registered before the segment exists, so an owner that dies right after still gets it unlinked.
  # 64 random bits make a clash unlikely; exclusive create turns one into a retry, not a shared file.
  defp create_mapped(data, nbytes, owner, pool, tries) do
    name = new_name()
    :ok = GenServer.call(__MODULE__, {:register, name, owner, pool})

    case Native.create(name, nbytes) do
      {:ok, seg, inode} ->
        case write_data(seg, data) do
          :ok ->
            {:ok, %{name: name, nbytes: nbytes, inode: inode, mapping: seg}}

          {:error, _} = err ->
            free(name)
            err
        end

      {:error, {:eexist, _}} when tries > 1 ->
        GenServer.call(__MODULE__, {:forget, name})
        create_mapped(data, nbytes, owner, pool, tries - 1)

      {:error, {errno, syscall}} ->
        # The NIF unlinked what it had made.
        GenServer.call(__MODULE__, {:forget, name})
        {:error, create_error(path(name), nbytes, errno, "#{syscall}")}
    end
  end

  defp write_data(_seg, {:zeros, _}), do: :ok
  defp write_data(seg, io), do: write_mapped(seg, 0, IO.iodata_to_binary(io))

  # A memcpy longer than this (~0.1 ms) runs on a dirty scheduler, never holding a normal one.
  @dirty_write_bytes 1_048_576

  @doc "Copies `data` into a mapping of the VM's (the NIF path of `Sidecar.Tensor.write/3`)."
  @spec write_mapped(Native.segment(), non_neg_integer, binary) :: :ok | {:error, Sidecar.Error.t()}
  def write_mapped(seg, offset, data) do
    result =
      if byte_size(data) >= @dirty_write_bytes,
        do: Native.write_dirty(seg, offset, data),
        else: Native.write(seg, offset, data)

    case result do
      :ok -> :ok
      {:error, reason} -> {:error, Sidecar.Error.new(:invalid_argument, "cannot write #{byte_size(data)} bytes at #{offset}: #{inspect(reason)}", field: "data")}
    end
  end

  defp create_error(file, nbytes, errno, what) when errno in [:enospc, :enomem, :efbig, :edquot],
    do: no_space(file, nbytes, errno, what)

  defp create_error(file, _nbytes, errno, what),
    do: Sidecar.Error.new(:invalid_argument, "cannot create #{file}: #{:file.format_error(errno)} (#{what})")

  defp create_file(data, nbytes, owner, pool) do
    {:ok, name, fd} = claim_name(owner, pool, 4)
    file = path(name)

    with {:ok, fd} <- fd,
         {:ok, inode} <- fill(fd, file, data, nbytes) do
      {:ok, %{name: name, nbytes: nbytes, inode: inode, mapping: nil}}
    else
      {:error, %Sidecar.Error{} = err} ->
        free(name)
        {:error, err}

      {:error, reason} ->
        free(name)
        {:error, Sidecar.Error.new(:invalid_argument, "cannot create #{file}: #{format(reason)}")}
    end
  end

  defp format({:shell, out}), do: String.trim(out)
  defp format(reason), do: :file.format_error(reason)

  defp claim_name(owner, pool, tries) do
    name = new_name()
    :ok = GenServer.call(__MODULE__, {:register, name, owner, pool})

    case open_exclusive(path(name)) do
      {:error, :eexist} when tries > 1 ->
        GenServer.call(__MODULE__, {:forget, name})
        claim_name(owner, pool, tries - 1)

      fd ->
        {:ok, name, fd}
    end
  end

  # Mode 0600 from creation: `file:open` cannot pass a mode, so a shell with umask 077 makes the
  # file, with noclobber (O_EXCL: an existing path, e.g. a planted symlink, is refused).
  defp open_exclusive(file) do
    case System.cmd("sh", ["-c", ~S(umask 077; set -C; : > "$1"), "sidecar-shm", file], stderr_to_stdout: true) do
      {_, 0} -> File.open(file, [:write, :read, :raw, :binary])
      {out, _} -> if File.exists?(file), do: {:error, :eexist}, else: {:error, {:shell, out}}
    end
  end

  defp fill(fd, file, data, nbytes) do
    result =
      with :ok <- reserve(fd, nbytes),
           :ok <- write_file(fd, data),
           # The inode from the open descriptor: the one the worker will map, whatever the path does.
           {:ok, info} <- :file.read_file_info(fd) do
        {:ok, File.Stat.from_record(info).inode}
      end

    File.close(fd)

    case result do
      {:ok, inode} ->
        {:ok, inode}

      {:error, reason} when reason in [:enospc, :enomem, :efbig, :edquot] ->
        {:error, no_space(file, nbytes, reason, "write")}

      {:error, reason} ->
        {:error, reason}
    end
  end

  defp write_file(_fd, {:zeros, _}), do: :ok
  defp write_file(fd, io), do: :file.pwrite(fd, 0, io)

  defp reserve(_fd, 0), do: :ok

  defp reserve(fd, nbytes) do
    case :file.allocate(fd, 0, nbytes) do
      :ok -> :ok
      # Some filesystems lack fallocate; tmpfs has it. Fall back to a sized (sparse) file.
      {:error, :enotsup} -> with {:ok, _} <- :file.position(fd, nbytes), do: :file.truncate(fd)
      err -> err
    end
  end

  defp no_space(file, nbytes, reason, what) do
    {free, total} = usage()

    Sidecar.Error.new(
      :out_of_memory,
      "cannot reserve #{nbytes} bytes for shared-memory segment #{file}: #{:file.format_error(reason)} (#{what}) " <>
        "(#{free} of #{total} bytes free in #{@dir})",
      device: "shm",
      requested_bytes: nbytes,
      free_bytes: free,
      total_bytes: total
    )
  end

  @doc "(free bytes, total bytes) of /dev/shm, from `df` (only needed on error paths)."
  @spec usage() :: {non_neg_integer, non_neg_integer}
  def usage do
    with {out, 0} <- System.cmd("df", ["-P", "-B1", @dir], stderr_to_stdout: true),
         [_, line | _] <- String.split(out, "\n"),
         [_, total, _used, free | _] <- String.split(line) do
      {String.to_integer(free), String.to_integer(total)}
    else
      _ -> {0, 0}
    end
  end

  @doc "Reads `nbytes` at `offset` of a segment (one copy, from the page cache)."
  @spec read(String.t(), non_neg_integer, non_neg_integer) :: {:ok, binary} | {:error, Sidecar.Error.t()}
  def read(name, offset, nbytes) do
    with_fd(name, [:read], fn fd ->
      case :file.pread(fd, offset, nbytes) do
        {:ok, bin} when byte_size(bin) == nbytes -> {:ok, bin}
        :eof when nbytes == 0 -> {:ok, <<>>}
        other -> {:error, bad_ref(name, "has fewer than #{offset + nbytes} bytes (#{inspect(other)})")}
      end
    end)
  end

  @doc "Overwrites `data` at `offset` of one of the VM's segments (reuse without a fresh segment)."
  @spec write(String.t(), non_neg_integer, iodata) :: :ok | {:error, Sidecar.Error.t()}
  def write(name, offset, data) do
    with_fd(name, [:read, :write], fn fd ->
      case :file.pwrite(fd, offset, data) do
        :ok -> :ok
        {:error, reason} -> {:error, bad_ref(name, "cannot be written: #{:file.format_error(reason)}")}
      end
    end)
  end

  # Checks the name, opens the segment, runs `fun` on the descriptor and always closes it.
  defp with_fd(name, modes, fun) do
    with :ok <- check_name(name),
         {:ok, fd} <- open(name, modes) do
      try do
        fun.(fd)
      after
        File.close(fd)
      end
    end
  end

  defp open(name, modes) do
    case File.open(path(name), [:raw, :binary | modes]) do
      {:ok, fd} -> {:ok, fd}
      {:error, reason} -> {:error, bad_ref(name, "cannot be opened: #{:file.format_error(reason)}")}
    end
  end

  defp check_name(name) do
    if valid_name?(name),
      do: :ok,
      else: {:error, bad_ref(inspect(name), "is not a /sc-<run>-<pid>-<hex> name")}
  end

  defp bad_ref(name, what),
    do: Sidecar.Error.new(:invalid_tensor_ref, "shared-memory segment #{name} #{what}", field: "name")

  @doc "Unlinks one of the VM's segments and forgets it (no error when already gone)."
  @spec free(String.t()) :: :ok
  def free(name), do: GenServer.call(__MODULE__, {:free, name})

  @doc "Unlinks every segment the VM registered (its processes are about to end with the VM)."
  @spec free_all() :: :ok
  def free_all, do: GenServer.call(__MODULE__, :free_all)

  @doc "Unlinks every segment registered for `pool`."
  @spec free_pool(atom) :: :ok
  def free_pool(pool), do: GenServer.call(__MODULE__, {:free_pool, pool})

  @doc "Names of the VM's live segments (for tests and status)."
  @spec registered() :: [String.t()]
  def registered, do: GenServer.call(__MODULE__, :registered)

  @doc """
  Unlinks the segments of this run that belong to OS process `os_pid` (a worker that died or was
  stopped). Returns how many it removed.
  """
  @spec unlink_os_pid(non_neg_integer) :: non_neg_integer
  def unlink_os_pid(os_pid) do
    "/" <> file_prefix = owner_prefix(os_pid)
    unlink_matching(file_prefix)
  end

  @doc """
  Unlinks the segments of every run (or of `run`) whose owner process is dead (or is a newer
  process reusing its pid): what a VM killed with SIGKILL, or a worker killed with it, left behind.
  Memory rule 6, as the Python pool does it (`sidecar.dataplane.reaper.reap_dead_owners`). Returns
  how many it removed.
  """
  @spec sweep_dead_owners(String.t() | nil) :: non_neg_integer
  def sweep_dead_owners(run \\ nil) do
    list_dir()
    |> Enum.filter(fn file ->
      case Regex.run(@name_re, "/" <> file) do
        [_, r, pid, _] when run == nil or r == run ->
          not OsProcess.file_owner_alive?(String.to_integer(pid), Path.join(@dir, file))

        _ ->
          false
      end
    end)
    |> Enum.count(&(File.rm(Path.join(@dir, &1)) == :ok))
  end

  @doc "Every file of this run still in /dev/shm."
  @spec run_files() :: [String.t()]
  def run_files, do: Enum.filter(list_dir(), &String.starts_with?(&1, "sc-#{run_id()}-"))

  defp unlink_matching(prefix) do
    list_dir()
    |> Enum.filter(&String.starts_with?(&1, prefix))
    |> Enum.count(&(File.rm(Path.join(@dir, &1)) == :ok))
  end

  defp list_dir do
    case File.ls(@dir) do
      {:ok, files} -> files
      _ -> []
    end
  end

  # -- registry ------------------------------------------------------------------------------------

  # $SIDECAR_RUN_PREFIX tags random run ids (a test session sets it to find what it created).
  defp run_prefix do
    prefix = System.get_env("SIDECAR_RUN_PREFIX", "")
    if byte_size(prefix) <= 20 and Regex.match?(~r/\A[A-Za-z0-9]*\z/, prefix), do: prefix, else: ""
  end

  @impl true
  def init([]) do
    Process.flag(:trap_exit, true)
    run = System.get_env("SIDECAR_RUN_ID", "")

    run =
      if Regex.match?(@run_re, run),
        do: run,
        else: run_prefix() <> Base.encode16(:rand.bytes(6), case: :lower)

    :persistent_term.put({__MODULE__, :run_id}, run)
    :persistent_term.put({__MODULE__, :os_pid}, String.to_integer(System.pid()))
    # segments: name => {owner, pool}; owners: pid => monitor ref
    {:ok, %{segments: %{}, owners: %{}}}
  end

  @impl true
  def handle_call({:register, name, owner, pool}, _from, state) do
    owners =
      if Map.has_key?(state.owners, owner),
        do: state.owners,
        else: Map.put(state.owners, owner, Process.monitor(owner))

    {:reply, :ok, %{state | segments: Map.put(state.segments, name, {owner, pool}), owners: owners}}
  end

  def handle_call({:forget, name}, _from, state),
    do: {:reply, :ok, %{state | segments: Map.delete(state.segments, name)}}

  def handle_call({:free, name}, _from, state) do
    unlink(name)
    {:reply, :ok, %{state | segments: Map.delete(state.segments, name)}}
  end

  def handle_call({:free_pool, pool}, _from, state) do
    {gone, kept} = Enum.split_with(state.segments, fn {_, {_, p}} -> p == pool end)
    Enum.each(gone, fn {name, _} -> unlink(name) end)
    {:reply, :ok, %{state | segments: Map.new(kept)}}
  end

  def handle_call(:free_all, _from, state) do
    Enum.each(Map.keys(state.segments), &unlink/1)
    {:reply, :ok, %{state | segments: %{}}}
  end

  def handle_call(:registered, _from, state), do: {:reply, Map.keys(state.segments), state}

  @impl true
  def handle_info({:DOWN, _ref, :process, owner, _reason}, state) do
    {gone, kept} = Enum.split_with(state.segments, fn {_, {o, _}} -> o == owner end)
    Enum.each(gone, fn {name, _} -> unlink(name) end)
    {:noreply, %{state | segments: Map.new(kept), owners: Map.delete(state.owners, owner)}}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Enum.each(Map.keys(state.segments), &unlink/1)
  end

  defp unlink(name) do
    case File.rm(path(name)) do
      :ok -> :ok
      {:error, :enoent} -> :ok
      {:error, reason} -> Logger.warning("cannot unlink #{name}: #{:file.format_error(reason)}")
    end
  end
end
