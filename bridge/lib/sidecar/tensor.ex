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

  Bytes are in the machine's native byte order and C (row-major) order, like NumPy's `tobytes()`:
  for float32 use `<<x::float-32-native>>`.

  A VM segment belongs to the process that created it (or `owner:`) and is unlinked by `free/1`,
  when that process exits, when the `pool:` it was created for stops, or when the application stops.
  """

  alias Sidecar.{Error, Shm}

  defstruct dtype: nil, shape: [], strides: nil, storage: nil, lease: nil

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
          lease: {pid, [String.t()]} | nil
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
    with {:ok, dtype, shape} <- check(dtype, shape),
         :ok <- check_size(byte_size(binary), dtype, shape) do
      if inline?(byte_size(binary), opts) do
        {:ok, %__MODULE__{dtype: dtype, shape: shape, storage: {:data, binary}}}
      else
        with {:ok, seg} <- Shm.create(binary, Keyword.get(opts, :owner, self()), opts[:pool]) do
          {:ok, %__MODULE__{dtype: dtype, shape: shape, storage: {:shm, Map.put(seg, :offset, 0)}}}
        end
      end
    end
  end

  @doc "Like `from_binary/4`, raising `Sidecar.Error` on failure."
  @spec from_binary!(binary, String.t() | atom, [non_neg_integer], keyword) :: t
  def from_binary!(binary, dtype, shape, opts \\ []), do: unwrap!(from_binary(binary, dtype, shape, opts))

  @doc """
  A zero-filled tensor in a new VM segment: a destination for `out:` (the worker writes the result
  straight into it) or a buffer to fill with `write/2`. Options `:owner` and `:pool` as in `from_binary/4`.
  """
  @spec empty(String.t() | atom, [non_neg_integer], keyword) :: {:ok, t} | {:error, Error.t()}
  def empty(dtype, shape, opts \\ []) do
    with {:ok, dtype, shape} <- check(dtype, shape),
         {:ok, seg} <-
           Shm.create(
             {:zeros, Enum.product(shape) * itemsize(dtype)},
             Keyword.get(opts, :owner, self()),
             opts[:pool]
           ) do
      {:ok, %__MODULE__{dtype: dtype, shape: shape, storage: {:shm, Map.put(seg, :offset, 0)}}}
    end
  end

  @doc """
  Overwrites the bytes of a shared-memory tensor in place (same size): reusing a segment skips the
  cost of a fresh one (page allocation) in loops.
  """
  @spec write(t, binary) :: :ok | {:error, Error.t()}
  def write(%__MODULE__{storage: {:shm, %{name: name, offset: off, nbytes: n}}}, binary)
      when byte_size(binary) == n,
      do: Shm.write(name, off, binary)

  def write(%__MODULE__{storage: {:shm, %{nbytes: n}}}, binary),
    do:
      {:error,
       Error.new(:invalid_argument, "write needs #{n} bytes, got #{byte_size(binary)}", field: "data")}

  def write(%__MODULE__{}, _),
    do: {:error, Error.new(:invalid_argument, "only shared-memory tensors can be written in place")}

  @doc """
  The tensor's bytes as a binary: inline data as is, a shared-memory tensor read from its segment
  (one copy). For a worker output read it before releasing its lease.
  """
  @spec to_binary(t) :: {:ok, binary} | {:error, Error.t()}
  def to_binary(%__MODULE__{storage: {:data, bin}}), do: {:ok, bin}

  def to_binary(%__MODULE__{storage: {:shm, %{name: name, offset: off, nbytes: n}}}),
    do: Shm.read(name, off, n)

  def to_binary(%__MODULE__{storage: {kind, _}}),
    do: {:error, Error.new(:device_unavailable, "a #{kind} tensor cannot be read from the VM")}

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

  defp own?(name), do: String.starts_with?(name, "/sc-#{Shm.run_id()}-#{Shm.os_pid()}-")

  @doc false
  # The wire form: {:tensor, %{dtype:, shape:, strides:, shm: ... | data: ...}}.
  def to_term(%__MODULE__{dtype: dtype, shape: shape, strides: strides, storage: {kind, s}}) do
    key = if kind == :data, do: :data, else: kind
    {:tensor, %{key => s, :dtype => dtype, :shape => shape, :strides => strides}}
  end

  @doc false
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
        {:data, bin} -> "#{byte_size(bin)} bytes inline"
        {:shm, %{name: n, nbytes: b}} -> "#{b} bytes in #{n}"
        {kind, _} -> to_string(kind)
      end

    lease = if lease, do: ", leased", else: ""
    concat(["#Sidecar.Tensor<", to_doc(d, opts), " ", to_doc(s, opts), ", ", where, lease, ">"])
  end
end
