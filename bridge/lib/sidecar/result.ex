defmodule Sidecar.Result do
  @moduledoc """
  What a successful `Sidecar.call/4` returns.

    * `outputs` - the op's outputs: `%Sidecar.Tensor{}` for tensors, plain terms for the rest
      (numbers, binaries, lists, maps with binary keys; non-finite floats as `:nan`, `:infinity`,
      `:neg_infinity`).
    * `timing` - `%{queue_ns:, decode_ns:, compute_ns:, encode_ns:, total_ns:}` measured in the worker,
      plus `round_trip_ns` measured by the caller.
    * `leases` - output leases still held (only with `read: false`): hand them back with
      `Sidecar.release/1` once the outputs have been read.
    * `gc_leases` - the leases the output binaries of a zero-copy result hold (`read: true` with
      the NIF): nothing to do, the worker gets them back once those binaries are garbage collected.
  """
  defstruct outputs: [],
            timing: %{},
            device: nil,
            bytes_in: 0,
            bytes_out: 0,
            request_id: nil,
            leases: [],
            gc_leases: [],
            worker: nil,
            os_pid: nil

  @type t :: %__MODULE__{
          outputs: [term],
          timing: map,
          device: String.t(),
          bytes_in: non_neg_integer,
          bytes_out: non_neg_integer,
          request_id: String.t(),
          leases: [String.t()],
          gc_leases: [String.t()],
          worker: pid,
          os_pid: non_neg_integer
        }
end
