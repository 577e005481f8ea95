defmodule Sidecar.Tensor do
  @moduledoc """
  A tensor as the sidecar sees it: dtype (NumPy names), shape, optional byte strides, and where its
  bytes are.

    * `{:shm, %{name:, offset:, nbytes:, inode:}}` - in a shared-memory segment: one of the VM's own
      (made by `from_binary/4` or `empty/3`) or a worker's output segment (held by a lease).
    * `{:data, binary}` - inline: small tensors only (below the inline threshold, 64 KiB by default),
      or a result already read back.

  Large data never travels through the port: `from_binary/4` writes it into a segment of the VM and
  the call carries only the descriptor; results are read straight from the worker's segment.

  With the NIF (`Sidecar.Native`, the default where it was built):

    * a result's bytes (`{:data, binary}`) are a binary that *is* the worker's mapping: no copy; the
      worker's lease on them is released when the last binary made from them is garbage collected;
    * `from_binary/4` copies the bytes once into a new mapped segment (on a dirty scheduler for
      large ones); given a binary that already lies in shared memory (a result, or a part of one)
      it copies nothing and describes that memory;
    * `alloc/3` makes a segment to fill with `write/3`, then to send as an input, again and again.

  Bytes are in the machine's native byte order and C (row-major) order, like NumPy's `tobytes()`:
  for float32 use `<<x::float-32-native>>`.

  A VM segment belongs to the process that created it (or `owner:`) and is unlinked by `free/1`,
  when that process exits, when the `pool:` it was created for stops, or when the application stops.
  """

  alias Sidecar.{Error, Shm}

  # `mapping`: what keeps the tensor's shared memory mapped while the tensor lives (the VM's own
  # segment, a NIF resource; or the binary a zero-copy input was made from). Never sent.
  defstruct dtype: nil, shape: [], strides: nil, storage: nil, lease: nil, mapping: nil

  @type storage ::
          {:shm,
           %{name: String.t(), offset: non_neg_integer, nbytes: non_neg_integer, inode: non_neg_integer}}
          | {:data, binary}
          | {:cuda_ipc, map}
  @type t :: %__MODULE__{
          dtype: String.t(),
          shape: [non_neg_integer],
          strides: [integer] | nil,
          storage: storage,
          lease: {pid, [String.t()]} | nil,
          mapping: Sidecar.Native.segment() | binary | nil
        }

  @itemsize %{
    "bool" => 1,
    "int8" => 1,
    "int16" => 2,
    "int32" => 4,
    "int64" => 8,
    "uint8" => 1,
    "uint16" => 2,
    "uint32" => 4,
    "uint64" => 8,
    "float16" => 2,
    "bfloat16" => 2,
    "float32" => 4,
    "float64" => 8,
    "complex64" => 8,
    "complex128" => 16
  }

  @default_inline_threshold 65_536

  @doc "Supported dtype names."
  @spec dtypes() :: [String.t()]
  def dtypes, do: Map.keys(@itemsize) |> Enum.sort()

  @doc "Bytes per element of `dtype`."
  @spec itemsize(String.t() | atom) :: pos_integer
  def itemsize(dtype), do: Map.fetch!(@itemsize, to_string(dtype))

  @doc "Bytes the tensor spans."
  @spec nbytes(t) :: non_neg_integer
  def nbytes(%__MODULE__{storage: {:data, bin}}), do: byte_size(bin)
  def nbytes(%__MODULE__{storage: {_, %{nbytes: n}}}), do: n

  @doc """
  A tensor holding `binary` with `dtype` and `shape`.

  Options:
    * `:inline` - `true` sends the bytes inside the port message, `false` always uses shared memory,
      `:auto` (default) inlines below `:inline_threshold` bytes (default #{@default_inline_threshold}).
    * `:owner` - the process whose exit unlinks the segment (default: the caller).
    * `:pool` - also unlink the segment when this pool stops.
  """
  @spec from_binary(binary, String.t() | atom, [non_neg_integer], keyword) :: {:ok, t} | {:error, Error.t()}
  def from_binary(binary, dtype, shape, opts \\ []) when is_binary(binary) do
    opts = Keyword.validate!(opts, [:owner, :pool, inline: :auto, inline_threshold: @default_inline_threshold])

    with {:ok, dtype, shape} <- check(dtype, shape),
         :ok <- check_size(byte_size(binary), dtype, shape) do
      cond do
        inline?(byte_size(binary), opts) ->
          {:ok, %__MODULE__{dtype: dtype, shape: shape, storage: {:data, binary}}}

        shm = shared(binary) ->
          {:ok, %__MODULE__{dtype: dtype, shape: shape, storage: {:shm, shm}, mapping: binary}}

        true ->
          with {:ok, seg} <- Shm.create(binary, Keyword.get(opts, :owner, self()), opts[:pool]) do
            {:ok, segment_tensor(dtype, shape, seg)}
          end
      end
    end
  end

  @doc false
  # The descriptor of the shared memory `binary` lies in (a zero-copy result, or part of one), when
  # it lies in a segment of the naming rule; nil otherwise.
  @spec shared(binary) :: map | nil
  def shared(binary) do
    with true <- Sidecar.Native.loaded?(),
         {:ok, name, offset, inode, _writable} <- Sidecar.Native.locate(binary),
         true <- Shm.valid_name?(name) do
      %{name: name, offset: offset, nbytes: byte_size(binary), inode: inode}
    else
      _ -> nil
    end
  end

  defp segment_tensor(dtype, shape, seg) do
    {mapping, seg} = Map.pop(seg, :mapping)
    %__MODULE__{dtype: dtype, shape: shape, storage: {:shm, Map.put(seg, :offset, 0)}, mapping: mapping}
  end

  @doc "Like `from_binary/4`, raising `Sidecar.Error` on failure."
  @spec from_binary!(binary, String.t() | atom, [non_neg_integer], keyword) :: t
  def from_binary!(binary, dtype, shape, opts \\ []), do: unwrap!(from_binary(binary, dtype, shape, opts))

  @doc """
  A zero-filled, writable tensor in a new segment of the VM (space reserved, pages pre-faulted):
  fill it with `write/3` and pass it as an input, as often as you like; or pass it as `out:` and
  the worker writes the result straight into it. Options `:owner` and `:pool` as in `from_binary/4`.
  """
  @spec alloc(String.t() | atom, [non_neg_integer], keyword) :: {:ok, t} | {:error, Error.t()}
  def alloc(dtype, shape, opts \\ []) do
    opts = Keyword.validate!(opts, [:owner, :pool])

    with {:ok, dtype, shape} <- check(dtype, shape),
         {:ok, seg} <-
           Shm.create({:zeros, Enum.product(shape) * itemsize(dtype)}, Keyword.get(opts, :owner, self()), opts[:pool]) do
      {:ok, segment_tensor(dtype, shape, seg)}
    end
  end

  @doc "The same as `alloc/3` (its former name)."
  @spec empty(String.t() | atom, [non_neg_integer], keyword) :: {:ok, t} | {:error, Error.t()}
  def empty(dtype, shape, opts \\ []), do: alloc(dtype, shape, opts)

  @doc """
  Overwrites all the bytes of a VM segment tensor (`binary` has its size): reusing a segment skips
  the cost of a fresh one (page allocation) in loops. See `write/3`.
  """
  @spec write(t, binary) :: :ok | {:error, Error.t()}
  def write(%__MODULE__{storage: {:shm, %{nbytes: n}}} = t, binary) when byte_size(binary) == n, do: write(t, 0, binary)

  def write(%__MODULE__{storage: {:shm, %{nbytes: n}}}, binary) when is_binary(binary),
    do: {:error, Error.new(:invalid_argument, "write needs #{n} bytes, got #{byte_size(binary)}", field: "data")}

  def write(%__MODULE__{}, _),
    do: {:error, Error.new(:invalid_argument, "only shared-memory tensors can be written in place")}

  @doc """
  Copies `binary` into a VM segment tensor at byte `offset` (one copy, straight into the mapping
  with the NIF, on a dirty scheduler when large; file I/O without it). Only the VM's own segments
  (`alloc/3`, `from_binary/4`) are writable; a write past the end is refused.
  """
  @spec write(t, non_neg_integer, binary) :: :ok | {:error, Error.t()}
  def write(%__MODULE__{storage: {:shm, %{name: name, offset: base, nbytes: n}}} = t, offset, binary)
      when is_integer(offset) and offset >= 0 and is_binary(binary) do
    cond do
      offset + byte_size(binary) > n ->
        {:error,
         Error.new(:invalid_argument, "write of #{byte_size(binary)} bytes at #{offset} is past the tensor's #{n} bytes",
           field: "data"
         )}

      not own?(name) ->
        {:error, Error.new(:invalid_argument, "only the VM's own segments can be written in place", field: "name")}

      is_reference(t.mapping) ->
        Shm.write_mapped(t.mapping, base + offset, binary)

      true ->
        Shm.write(name, base + offset, binary)
    end
  end

  def write(%__MODULE__{}, _offset, _binary),
    do: {:error, Error.new(:invalid_argument, "write takes a shared-memory tensor, an offset >= 0 and a binary")}

  @doc """
  The tensor's bytes as a binary: inline data (or a zero-copy result) as is. A worker output still
  leased (`read: false`): with the NIF a binary of its mapping, no copy, that keeps the lease held
  until it is garbage collected; without it one copy (read it before releasing the lease). A
  segment of the VM: a copy (its bytes can still change, see `view/1`).
  """
  @spec to_binary(t) :: {:ok, binary} | {:error, Error.t()}
  def to_binary(%__MODULE__{storage: {:data, bin}}), do: {:ok, bin}

  def to_binary(%__MODULE__{storage: {:shm, shm}, lease: {worker, ids}}) when ids != [] do
    if Sidecar.Native.loaded?(), do: Sidecar.Worker.view(worker, shm, ids), else: Shm.read(shm.name, shm.offset, shm.nbytes)
  end

  def to_binary(%__MODULE__{mapping: seg} = t) when is_reference(seg) do
    with {:ok, bin} <- view(t), do: {:ok, :binary.copy(bin)}
  end

  def to_binary(%__MODULE__{storage: {:shm, %{name: name, offset: off, nbytes: n}}}),
    do: Shm.read(name, off, n)

  def to_binary(%__MODULE__{storage: {kind, _}}),
    do: {:error, Error.new(:device_unavailable, "a #{kind} tensor cannot be read from the VM")}

  @doc """
  A binary that *is* a VM segment tensor's memory (NIF only, no copy): it keeps the segment mapped,
  and it changes when the segment is written (`write/3`, an `out:` call). Use `to_binary/1` for a
  snapshot.
  """
  @spec view(t) :: {:ok, binary} | {:error, Error.t()}
  def view(%__MODULE__{storage: {:shm, %{offset: off, nbytes: n}}, mapping: seg}) when is_reference(seg) do
    case Sidecar.Native.view(seg, off, n) do
      {:ok, bin} -> {:ok, bin}
      {:error, reason} -> {:error, Error.new(:invalid_tensor_ref, "cannot view the segment: #{inspect(reason)}")}
    end
  end

  def view(%__MODULE__{}),
    do: {:error, Error.new(:invalid_argument, "only a mapped segment of the VM can be viewed (the NIF is needed)")}

  @doc "Like `to_binary/1`, raising `Sidecar.Error` on failure."
  @spec to_binary!(t) :: binary
  def to_binary!(t), do: unwrap!(to_binary(t))

  @doc """
  Frees what the tensor holds: unlinks a segment of this VM, releases a worker output's lease
  (asynchronously); nothing for inline data.
  """
  @spec free(t) :: :ok
  def free(%__MODULE__{lease: {worker, ids}}) when ids != [] do
    Sidecar.Worker.release(worker, ids)
  end

  def free(%__MODULE__{storage: {:shm, %{name: name}}}) do
    if own?(name), do: Shm.free(name), else: :ok
  end

  def free(%__MODULE__{}), do: :ok

  @doc false
  @spec own?(String.t()) :: boolean
  def own?(name), do: String.starts_with?(name, Shm.owner_prefix(Shm.os_pid()))

  @doc false
  # The wire form: {:tensor, %{dtype:, shape:, strides:, shm: ... | data: ...}}.
  @spec to_term(t) :: {:tensor, map}
  def to_term(%__MODULE__{dtype: dtype, shape: shape, strides: strides, storage: {kind, s}}) do
    {:tensor, %{kind => s, :dtype => dtype, :shape => shape, :strides => strides}}
  end

  @doc false
  @spec from_term(map, {pid, [String.t()]} | nil) :: t
  def from_term(%{dtype: dtype, shape: shape} = m, lease \\ nil) do
    storage =
      cond do
        Map.has_key?(m, :shm) -> {:shm, m.shm}
        Map.has_key?(m, :data) -> {:data, m.data}
        Map.has_key?(m, :cuda_ipc) -> {:cuda_ipc, m.cuda_ipc}
      end

    %__MODULE__{dtype: dtype, shape: shape, strides: m[:strides], storage: storage, lease: lease}
  end

  defp inline?(size, opts) do
    case Keyword.get(opts, :inline, :auto) do
      true -> true
      false -> false
      :auto -> size < Keyword.get(opts, :inline_threshold, @default_inline_threshold)
    end
  end

  defp check(dtype, shape) do
    dtype = to_string(dtype)

    cond do
      not Map.has_key?(@itemsize, dtype) ->
        {:error,
         Error.new(
           :invalid_tensor_ref,
           "unsupported dtype #{inspect(dtype)}; supported: #{Enum.join(dtypes(), ", ")}",
           field: "dtype"
         )}

      not (is_list(shape) and Enum.all?(shape, &(is_integer(&1) and &1 >= 0))) ->
        {:error,
         Error.new(
           :invalid_tensor_ref,
           "shape must be a list of non-negative integers, got #{inspect(shape)}",
           field: "shape"
         )}

      true ->
        {:ok, dtype, shape}
    end
  end

  defp check_size(size, dtype, shape) do
    want = Enum.product(shape) * itemsize(dtype)

    if size == want,
      do: :ok,
      else:
        {:error,
         Error.new(
           :invalid_tensor_ref,
           "#{dtype} #{inspect(shape)} needs #{want} bytes, the binary has #{size}",
           field: "nbytes",
           expected: "#{want}",
           got: "#{size}"
         )}
  end

  defp unwrap!({:ok, v}), do: v
  defp unwrap!({:error, %Error{} = e}), do: raise(e)
end

defimpl Inspect, for: Sidecar.Tensor do
  import Inspect.Algebra

  def inspect(%Sidecar.Tensor{dtype: d, shape: s, storage: storage, lease: lease}, opts) do
    where =
      case storage do
        {:data, bin} -> data_text(bin)
        {:shm, %{name: n, nbytes: b}} -> "#{b} bytes in #{n}"
        {kind, _} -> to_string(kind)
      end

    lease = if lease, do: ", leased", else: ""
    concat(["#Sidecar.Tensor<", to_doc(d, opts), " ", to_doc(s, opts), ", ", where, lease, ">"])
  end

  defp data_text(bin) do
    case Sidecar.Tensor.shared(bin) do
      %{name: name} -> "#{byte_size(bin)} bytes, a zero-copy view of #{name}"
      nil -> "#{byte_size(bin)} bytes inline"
    end
  end
end
