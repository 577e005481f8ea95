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

  alias Sidecar.OsProcess

  @dir "/dev/shm"
  @name_re ~r/^\/sc-([A-Za-z0-9]{1,32})-([0-9]{1,10})-([0-9a-f]{8,32})$/
  @run_re ~r/^[A-Za-z0-9]{1,32}$/

  @doc false
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

  @doc "A fresh name owned by this VM."
  @spec new_name() :: String.t()
  def new_name, do: "/sc-#{run_id()}-#{os_pid()}-#{Base.encode16(:rand.bytes(8), case: :lower)}"

  @doc """
  Creates a segment holding `data` (iodata) or `{:zeros, nbytes}`: exclusive create, mode 0600 before
  any byte is written, space reserved up front so a full `/dev/shm` is a clean `:out_of_memory`
  error here and never a SIGBUS in the worker. Registers it for `owner` (a pid) and `pool`.
  Returns `%{name:, nbytes:, inode:}`.
  """
  @spec create(iodata | {:zeros, non_neg_integer}, pid, atom | nil) ::
          {:ok, %{name: String.t(), nbytes: non_neg_integer, inode: non_neg_integer}}
          | {:error, Sidecar.Error.t()}
  def create(data, owner \\ self(), pool \\ nil) do
    nbytes =
      case data do
        {:zeros, n} -> n
        io -> IO.iodata_length(io)
      end

    {:ok, name, fd} = claim_name(owner, pool, 4)
    file = path(name)

    with {:ok, fd} <- fd,
         {:ok, inode} <- fill(fd, file, data, nbytes) do
      {:ok, %{name: name, nbytes: nbytes, inode: inode}}
    else
      {:error, %Sidecar.Error{} = err} ->
        free(name)
        {:error, err}

      {:error, reason} ->
        free(name)
        {:error, Sidecar.Error.new(:invalid_argument, "cannot create #{file}: #{:file.format_error(reason)}")}
    end
  end

  # Registered before the file exists, so an owner that dies right after still gets it unlinked.
  # 64 random bits make a clash unlikely; exclusive create turns one into a retry, not a shared file.
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

  defp open_exclusive(file) do
    with {:ok, fd} <- File.open(file, [:write, :exclusive, :raw, :binary]) do
      # Before the first byte: no window in which another user could read the data.
      case File.chmod(file, 0o600) do
        :ok -> {:ok, fd}
        err -> File.close(fd) && err
      end
    end
  end

  defp fill(fd, file, data, nbytes) do
    result =
      with :ok <- reserve(fd, nbytes),
           :ok <- write_data(fd, data),
           # The inode from the open descriptor: the one the worker will map, whatever the path does.
           {:ok, info} <- :file.read_file_info(fd) do
        {:ok, File.Stat.from_record(info).inode}
      end

    File.close(fd)

    case result do
      {:ok, inode} ->
        {:ok, inode}

      {:error, reason} when reason in [:enospc, :enomem, :efbig, :edquot] ->
        {:error, no_space(file, nbytes, reason)}

      {:error, reason} ->
        {:error, reason}
    end
  end

  defp write_data(_fd, {:zeros, _}), do: :ok
  defp write_data(fd, io), do: :file.pwrite(fd, 0, io)

  defp reserve(_fd, 0), do: :ok

  defp reserve(fd, nbytes) do
    case :file.allocate(fd, 0, nbytes) do
      :ok -> :ok
      # Some filesystems lack fallocate; tmpfs has it. Fall back to a sized (sparse) file.
      {:error, :enotsup} -> with {:ok, _} <- :file.position(fd, nbytes), do: :file.truncate(fd)
      err -> err
    end
  end

  defp no_space(file, nbytes, reason) do
    {free, total} = usage()

    Sidecar.Error.new(
      :out_of_memory,
      "cannot reserve #{nbytes} bytes for shared-memory segment #{file}: #{:file.format_error(reason)} " <>
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
  def unlink_os_pid(os_pid), do: unlink_matching("sc-#{run_id()}-#{os_pid}-")

  @doc """
  Unlinks the segments of every run whose owner process is dead (or is a newer process reusing its
  pid): what a VM killed with SIGKILL, or a worker killed with it, left behind. Memory rule 6, as
  the Python pool does it (`sidecar.dataplane.reaper.reap_dead_owners`). Returns how many it removed.
  """
  @spec sweep_dead_owners() :: non_neg_integer
  def sweep_dead_owners do
    list_dir()
    |> Enum.filter(fn file ->
      case Regex.run(@name_re, "/" <> file) do
        [_, _, pid, _] -> not OsProcess.file_owner_alive?(String.to_integer(pid), Path.join(@dir, file))
        _ -> false
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
