defmodule Sidecar.Error do
  @moduledoc """
  A structured error from a sidecar (or from the pool), matchable by `kind`:

      case Sidecar.call(pool, "add", [a, b]) do
        {:ok, result} -> result
        {:error, %Sidecar.Error{kind: :shape_mismatch, input_shapes: shapes, suggestion: hint}} -> ...
        {:error, %Sidecar.Error{kind: :worker_crashed, classification: :segfault}} -> ...
      end

  Kinds are the `sidecar.v1.ErrorKind` names in lower case: `:shape_mismatch`, `:dtype_mismatch`,
  `:device_mismatch`, `:out_of_memory`, `:invalid_tensor_ref`, `:unknown_op`, `:op_failed`,
  `:overloaded`, `:device_unavailable`, `:worker_crashed`, `:circuit_open` (the pool's breaker is
  open and no worker is ready; with the last crash's fields), `:invalid_argument`, `:cancelled`
  (also used for timeouts), `:resource_failed` (a resource could not be loaded: `resource`, `loader`,
  `cause`, `missing_keys`, `unexpected_keys`, `shape_mismatches`, `close_names`), `:session_lost`
  (the worker of a session died: `session_id` and the crash's `classification`). The other fields are those of `sidecar.v1.Error`; those an
  error does not use are `nil`. Fields this version does not know land in `details`.
  It is an exception too, so `Sidecar.call!/4` can raise it.
  """

  # sidecar.v1.Error's fields in proto order (protos/sidecar/v1/sidecar.proto is the source:
  # tests/test_protocol.py fails when this list and the proto differ), then the host-only ones.
  @fields [
    :op,
    :request_id,
    :input_shapes,
    :input_dtypes,
    :dim,
    :expected,
    :got,
    :suggestion,
    :device,
    :requested_bytes,
    :free_bytes,
    :total_bytes,
    :allocated_bytes,
    :reserved_bytes,
    :available,
    :input_index,
    :field,
    :close_names,
    :exception_type,
    :traceback,
    :queue_depth,
    :limit,
    :exit_code,
    :signal,
    :classification,
    :stderr_tail,
    :pid,
    :resource,
    :loader,
    :cause,
    :missing_keys,
    :unexpected_keys,
    :shape_mismatches,
    :architecture,
    :session_id,
    # host-side only (not in sidecar.v1.Error): every worker crash a :worker_crashed call went
    # through, oldest first, as %{pid:, classification:, exit_code:, signal:, caused:} maps
    # (caused: the work can have caused it, Sidecar.Exit.caused_by_work?/1)
    :crashes
  ]

  @kinds ~w(shape_mismatch dtype_mismatch device_mismatch out_of_memory invalid_tensor_ref unknown_op
            op_failed overloaded device_unavailable worker_crashed circuit_open invalid_argument
            cancelled resource_failed session_lost)a

  @field_names Map.new(@fields, &{Atom.to_string(&1), &1})

  defexception [:kind, :message, details: %{}] ++ Enum.map(@fields, &{&1, nil})

  @type kind ::
          :shape_mismatch
          | :dtype_mismatch
          | :device_mismatch
          | :out_of_memory
          | :invalid_tensor_ref
          | :unknown_op
          | :op_failed
          | :overloaded
          | :device_unavailable
          | :worker_crashed
          | :circuit_open
          | :invalid_argument
          | :cancelled
          | :resource_failed
          | :session_lost
  @type t :: %__MODULE__{kind: kind, message: String.t()}

  @doc "The error kinds, in `sidecar.v1.ErrorKind` order."
  @spec kinds() :: [kind]
  def kinds, do: @kinds

  @doc "The structured field names (besides `kind` and `message`)."
  @spec fields() :: [atom]
  def fields, do: @fields

  @doc "Builds an error from the worker's `%{kind: ..., message: ..., ...}` term."
  @spec from_term(term) :: t
  def from_term(%{} = term) do
    # A field whose atom did not exist yet when the frame was decoded (Sidecar.Frame creates none:
    # this module may not have been loaded then) arrives as a binary key.
    term = Map.new(term, fn {k, v} when is_binary(k) -> {Map.get(@field_names, k, k), v}; kv -> kv end)
    {kind, term} = Map.pop(term, :kind, :op_failed)
    {message, term} = Map.pop(term, :message, "")

    {known, unknown} = Enum.split_with(term, fn {k, _} -> is_atom(k) and k in @fields end)

    struct(
      %__MODULE__{kind: kind_atom(kind), message: text(message), details: unknown_kind(kind, Map.new(unknown))},
      normalize(known)
    )
  end

  def from_term(other),
    do: %__MODULE__{kind: :op_failed, message: "malformed error term from worker: #{inspect(other)}"}

  @doc "A new error of `kind` with `message` and fields."
  @spec new(kind, String.t(), keyword) :: t
  def new(kind, message, fields \\ []), do: struct(%__MODULE__{kind: kind, message: message}, fields)

  # Never String.to_atom on what a worker sends: a kind or classification this version does not
  # know stays text (`:op_failed` with the worker's kind in `details.kind` for kinds).
  @kind_names Map.new(@kinds, &{Atom.to_string(&1), &1})
  @classification_names Map.new(Sidecar.Exit.classifications(), &{Atom.to_string(&1), &1})

  defp kind_atom(kind) when kind in @kinds, do: kind
  defp kind_atom(kind) when is_atom(kind), do: kind_atom(Atom.to_string(kind))
  defp kind_atom(kind) when is_binary(kind), do: Map.get(@kind_names, String.downcase(kind), :op_failed)
  defp kind_atom(_), do: :op_failed

  defp unknown_kind(kind, known) do
    if is_binary(kind) and not Map.has_key?(@kind_names, String.downcase(kind)),
      do: Map.put(known, :kind, kind),
      else: known
  end

  # Classification arrives as a binary from the worker's own errors; atoms match better.
  defp normalize(fields) do
    Enum.map(fields, fn
      {:classification, c} when is_binary(c) -> {:classification, Map.get(@classification_names, c, c)}
      kv -> kv
    end)
  end

  defp text(message) when is_binary(message), do: message
  defp text(message), do: inspect(message)

  @impl true
  def message(%__MODULE__{kind: kind, message: message}), do: "#{kind}: #{message}"
end

defimpl Inspect, for: Sidecar.Error do
  import Inspect.Algebra

  # Only the fields that are set: an error has a handful of the 28 possible ones.
  def inspect(%Sidecar.Error{} = e, opts) do
    fields = for f <- [:kind, :message | Sidecar.Error.fields()], (v = Map.get(e, f)) != nil, do: {f, v}

    fields = if e.details == %{}, do: fields, else: fields ++ [details: e.details]

    container_doc("%Sidecar.Error{", fields, "}", opts, fn {k, v}, o ->
      concat([Atom.to_string(k), ": ", to_doc(v, o)])
    end)
  end
end
