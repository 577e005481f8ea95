defmodule Sidecar.Native do
  @moduledoc """
  The NIF (`c_src/sidecar_nif.c`): POSIX shared-memory segments mapped into the VM, their bytes
  handed out as binaries that *are* the mapping (no copy).

  Built by the Mix project itself (`Mix.Tasks.Compile.SidecarNative`, no hex package). It is
  optional: without a C compiler or `erl_nif.h`, or with `SIDECAR_NIF=0` in the environment, it is
  not loaded and the bridge uses its file I/O path (`Sidecar.Shm`): every byte read or written as
  file I/O, one copy each way. `status/0` says which, and why.

  The functions here are the NIF's, with no policy: a name only has to be POSIX's portable form
  (`"/"` and no other `"/"`, no NUL); which names are ours is `Sidecar.Shm`'s business. Results
  come back as `{:ok, ...}` or `{:error, {reason, what}}` (`{:badarg, :offset}`,
  `{:enospc, :posix_fallocate}`, ...), never an exception, whatever the arguments.

    * a segment (`t:segment/0`) is unmapped only when nothing refers to it any more: no term, no
      binary made from it, no lease;
    * `lease_views/3` makes binaries that share one lease: when the last of them is garbage
      collected, the NIF sends the given message to the given process (a worker, which then hands
      the lease back to its sidecar).
  """

  @on_load :load_nif

  @typedoc "A mapped segment (a NIF resource)."
  @type segment :: reference
  @type reason :: {atom, atom}

  @doc false
  @spec load_nif() :: :ok
  def load_nif do
    :persistent_term.put({__MODULE__, :status}, try_load())
    :ok
  end

  defp try_load do
    with :ok <- enabled(),
         {:ok, path} <- library_path() do
      case :erlang.load_nif(String.to_charlist(path), 0) do
        :ok -> :loaded
        {:error, {:reload, _}} -> :loaded
        {:error, {reason, text}} -> {:unavailable, "#{reason}: #{text}"}
      end
    end
  end

  defp enabled do
    value = System.get_env("SIDECAR_NIF", "")

    if String.downcase(value) in ~w(0 false off no),
      do: {:disabled, "SIDECAR_NIF=#{value} in the environment"},
      else: :ok
  end

  defp library_path do
    case :code.priv_dir(:sidecar_bridge) do
      {:error, _} ->
        {:unavailable, "the :sidecar_bridge application is not in the code path"}

      dir ->
        path = Path.join(dir, "sidecar_nif")

        if File.exists?(path <> ".so"),
          do: {:ok, path},
          else: {:unavailable, "#{path}.so was not built (no C compiler or erl_nif.h at compile time)"}
    end
  end

  @doc "True when the NIF is loaded (zero-copy binaries, segments mapped)."
  @spec loaded?() :: boolean
  def loaded?, do: status() == :loaded

  @doc "`:loaded`, `{:disabled, why}` or `{:unavailable, why}`."
  @spec status() :: :loaded | {:disabled | :unavailable, String.t()}
  def status, do: :persistent_term.get({__MODULE__, :status}, {:unavailable, "not loaded yet"})

  @doc """
  Creates segment `name` of `nbytes` bytes: `shm_open(O_CREAT | O_EXCL, 0600)`, space reserved
  (`posix_fallocate`), mapped read-write and pre-faulted. On a dirty I/O scheduler.
  """
  @spec create(binary, non_neg_integer) :: {:ok, segment, non_neg_integer} | {:error, reason}
  def create(_name, _nbytes), do: :erlang.nif_error(:not_loaded)

  @doc "Maps all of an existing segment, read-only unless `writable`; returns its size and inode."
  @spec open(binary, boolean) :: {:ok, segment, non_neg_integer, non_neg_integer} | {:error, reason}
  def open(_name, _writable), do: :erlang.nif_error(:not_loaded)

  @doc "A binary that is bytes `offset..offset+nbytes-1` of the mapping (no copy)."
  @spec view(segment, non_neg_integer, non_neg_integer) :: {:ok, binary} | {:error, reason}
  def view(_segment, _offset, _nbytes), do: :erlang.nif_error(:not_loaded)

  @doc """
  Binaries of `ranges` (`{segment, offset, nbytes}`, no copy) sharing one lease: `message` goes to
  `owner` once the last of them has been garbage collected.
  """
  @spec lease_views(pid, term, [{segment, non_neg_integer, non_neg_integer}]) ::
          {:ok, [binary]} | {:error, reason}
  def lease_views(_owner, _message, _ranges), do: :erlang.nif_error(:not_loaded)

  @doc "Copies `data` into a writable mapping at `offset` (on a normal scheduler: small data only)."
  @spec write(segment, non_neg_integer, binary) :: :ok | {:error, reason}
  def write(_segment, _offset, _data), do: :erlang.nif_error(:not_loaded)

  @doc "`write/3` on a dirty CPU scheduler, for data large enough to hold a scheduler too long."
  @spec write_dirty(segment, non_neg_integer, binary) :: :ok | {:error, reason}
  def write_dirty(_segment, _offset, _data), do: :erlang.nif_error(:not_loaded)

  @doc """
  Where a binary's bytes are, when they lie in a mapping of this VM (a view, or part of one):
  `{:ok, name, offset, inode, writable}`; `:not_found` for any other binary.
  """
  @spec locate(binary) :: {:ok, binary, non_neg_integer, non_neg_integer, boolean} | :not_found | {:error, reason}
  def locate(_binary), do: :erlang.nif_error(:not_loaded)
end
