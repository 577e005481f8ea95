defmodule Sidecar.Frame do
  @moduledoc """
  Decodes the External Term Format frames a worker sends, without ever creating an atom.

  `:erlang.binary_to_term(bin, [:safe])` refuses a frame that names an atom this VM does not know
  (a field a newer worker added, say), and never creating atoms from outside input is the point:
  the atom table is never garbage collected. So when the safe decode refuses a frame, the frame is
  rewritten with every unknown atom turned into a binary of its text and decoded safely again: the
  caller sees `"new_field"` where the worker sent `:new_field`. Only the tags the worker's encoder
  (`sidecar/etf.py`) writes are accepted; pids, ports, references and funs are malformed here.
  """

  @max_depth 256

  # The names this version of the protocol uses (sidecar/worker/stdio_server.py, its ready, result,
  # op list, hardware and telemetry terms): as literals of this module they exist once it is
  # loaded, so such frames decode as the worker wrote them. Only names a newer worker adds arrive
  # as binaries.
  @protocol_atoms ~w(alloc_nbytes already_subscribed arrow attrs bytes_in bytes_out call compute_ns
    cuda_ipc data decode_ns device device_index device_uuid doc dtype duration encode_ns error gpus
    handle idempotent inline_threshold inode kind leases max_concurrency max_inputs max_queue memory
    message min_inputs module name nan infinity neg_infinity nbytes num_rows offset ok op ops os_pid
    outputs queue_ns ready released request_id run_id shape shm sidecar strides subscribed
    system_time telemetry tensor timing total_ns undefined unknown unsubscribed version rss_bytes
    arena_reserved_bytes arena_in_use_bytes start stop exception
    arch available cores cpu cuda cuda_version devices driver_version flags hostname identity
    memory_available memory_total model mps_available pid platform python_version reason
    runtime_version sidecar_version threads torch_version chunk values index bytes)a

  @doc "The atom names of the protocol this version knows."
  @spec protocol_atoms() :: [atom]
  def protocol_atoms, do: @protocol_atoms

  @doc "The term in `bin`, or `{:error, :malformed}`."
  @spec decode(binary) :: {:ok, term} | {:error, :malformed}
  def decode(bin) when is_binary(bin) do
    {:ok, :erlang.binary_to_term(bin, [:safe])}
  rescue
    ArgumentError -> decode_rewritten(bin)
  end

  defp decode_rewritten(<<131, rest::binary>>) do
    with {:ok, io, <<>>} <- rewrite(rest, 0) do
      {:ok, :erlang.binary_to_term(IO.iodata_to_binary([131 | io]), [:safe])}
    else
      _ -> {:error, :malformed}
    end
  rescue
    ArgumentError -> {:error, :malformed}
  end

  defp decode_rewritten(_), do: {:error, :malformed}

  # rewrite(bytes, depth) -> {:ok, iodata of one term, rest} | :error
  defp rewrite(_, depth) when depth > @max_depth, do: :error
  defp rewrite(<<100, n::16, text::binary-size(n), rest::binary>>, _), do: atom(text, :latin1, rest)
  defp rewrite(<<115, n::8, text::binary-size(n), rest::binary>>, _), do: atom(text, :latin1, rest)
  defp rewrite(<<118, n::16, text::binary-size(n), rest::binary>>, _), do: atom(text, :utf8, rest)
  defp rewrite(<<119, n::8, text::binary-size(n), rest::binary>>, _), do: atom(text, :utf8, rest)
  defp rewrite(<<97, v, rest::binary>>, _), do: {:ok, [97, v], rest}
  defp rewrite(<<98, v::binary-4, rest::binary>>, _), do: {:ok, [98, v], rest}
  defp rewrite(<<70, v::binary-8, rest::binary>>, _), do: {:ok, [70, v], rest}
  defp rewrite(<<99, v::binary-31, rest::binary>>, _), do: {:ok, [99, v], rest}
  defp rewrite(<<106, rest::binary>>, _), do: {:ok, [106], rest}

  defp rewrite(<<109, n::32, v::binary-size(n), rest::binary>>, _),
    do: {:ok, [<<109, n::32>>, v], rest}

  defp rewrite(<<107, n::16, v::binary-size(n), rest::binary>>, _),
    do: {:ok, [<<107, n::16>>, v], rest}

  defp rewrite(<<77, n::32, bits, v::binary-size(n), rest::binary>>, _),
    do: {:ok, [<<77, n::32, bits>>, v], rest}

  defp rewrite(<<110, n, sign, v::binary-size(n), rest::binary>>, _),
    do: {:ok, [<<110, n, sign>>, v], rest}

  defp rewrite(<<111, n::32, sign, v::binary-size(n), rest::binary>>, _),
    do: {:ok, [<<111, n::32, sign>>, v], rest}

  defp rewrite(<<104, n, rest::binary>>, d), do: many(rest, n, d, [<<104, n>>])
  defp rewrite(<<105, n::32, rest::binary>>, d), do: many(rest, n, d, [<<105, n::32>>])
  defp rewrite(<<116, n::32, rest::binary>>, d), do: many(rest, 2 * n, d, [<<116, n::32>>])
  # A list: its elements, then its tail (NIL for a proper list).
  defp rewrite(<<108, n::32, rest::binary>>, d), do: many(rest, n + 1, d, [<<108, n::32>>])
  defp rewrite(_, _), do: :error

  defp many(rest, 0, _d, acc), do: {:ok, Enum.reverse(acc), rest}

  defp many(rest, n, d, acc) do
    case rewrite(rest, d + 1) do
      {:ok, io, rest} -> many(rest, n - 1, d, [io | acc])
      :error -> :error
    end
  end

  defp atom(text, encoding, rest) do
    utf8 = if encoding == :latin1, do: :unicode.characters_to_binary(text, :latin1), else: text

    if is_binary(utf8) and known_atom?(utf8),
      do: {:ok, [<<118, byte_size(utf8)::16>>, utf8], rest},
      else: {:ok, [<<109, byte_size(text)::32>>, text], rest}
  end

  defp known_atom?(text) do
    _ = String.to_existing_atom(text)
    true
  rescue
    ArgumentError -> false
  end
end
