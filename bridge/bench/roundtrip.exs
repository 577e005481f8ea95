# Round trip of a float32 tensor through a sidecar worker from Elixir, side by side:
#
#   shm_reused   the VM overwrites a segment it already has (Tensor.write/2), the call carries only
#                the descriptor, the worker's output is read back from its segment (pread) and its
#                lease released: the bytes are copied once in, once out, never through the port
#   shm_fresh    the same with a new segment per call (Tensor.from_binary/4 + free/1): adds the cost of
#                a fresh tmpfs segment (page allocation) on the VM side
#   shm_refs     only descriptors move: the input segment already holds the data and the output stays
#                in the worker's segment (read: false) until it is released (no byte copied by the VM)
#   inline       the same bytes inside the port messages both ways ({:packet, 4} frames, ETF binaries;
#                Tensor.from_binary(inline: true), placement: :inline)
#
# The op is `identity`; every result is checked byte for byte once per mode and size.
# Run from bridge/: mix run bench/roundtrip.exs [--json] [--sizes 1MB,100MB] [--repeat N]
# SIDECAR_PYTHON names the interpreter with the sidecar package (default ../.venv/bin/python).

alias Sidecar.Tensor

{opts, _, _} = OptionParser.parse(System.argv(), strict: [json: :boolean, sizes: :string, repeat: :integer])
sizes_by_name = %{"1MB" => 1_000_000, "10MB" => 10_000_000, "100MB" => 100_000_000}
sizes = String.split(Keyword.get(opts, :sizes, "1MB,100MB"), ",")
python = System.get_env("SIDECAR_PYTHON") || Path.expand("../.venv/bin/python", File.cwd!())
System.put_env("SIDECAR_PYTHON", python)

{:ok, _} = Sidecar.start_link(name: :bench, workers: 1, telemetry: false, timeout: 120_000)
:ok = Sidecar.await_ready(:bench, :all, 120_000)

repeat_for = fn nbytes -> Keyword.get(opts, :repeat, if(nbytes >= 50_000_000, do: 10, else: 200)) end

median = fn xs ->
  s = Enum.sort(xs)
  n = length(s)
  if rem(n, 2) == 1, do: Enum.at(s, div(n, 2)), else: (Enum.at(s, div(n, 2) - 1) + Enum.at(s, div(n, 2))) / 2
end

pct = fn xs, p -> Enum.at(Enum.sort(xs), min(length(xs) - 1, trunc(p * length(xs)))) end

time_us = fn fun ->
  t0 = System.monotonic_time()
  fun.()
  System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1000
end

rows =
  for name <- sizes do
    nbytes = Map.fetch!(sizes_by_name, name)
    n = div(nbytes, 4)
    data = :binary.copy(:rand.bytes(1_000_000), div(nbytes, 1_000_000))
    repeat = repeat_for.(nbytes)
    reused = Tensor.from_binary!(data, "float32", [n], inline: false)

    modes = [
      {"shm_reused",
       fn ->
         :ok = Tensor.write(reused, data)
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [reused])
         Tensor.to_binary!(out)
       end},
      {"shm_fresh",
       fn ->
         t = Tensor.from_binary!(data, "float32", [n], inline: false)
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [t])
         Tensor.free(t)
         Tensor.to_binary!(out)
       end},
      {"shm_refs",
       fn ->
         {:ok, r} = Sidecar.call(:bench, "identity", [reused], read: false)
         Sidecar.release(r)
         nil
       end},
      {"inline",
       fn ->
         t = Tensor.from_binary!(data, "float32", [n], inline: true)
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [t], placement: :inline)
         Tensor.to_binary!(out)
       end}
    ]

    results =
      for {mode, fun} <- modes do
        back = fun.()
        if back != nil and back != data, do: raise("#{mode} #{name}: bytes differ after the round trip")
        for _ <- 1..2, do: fun.()
        :erlang.garbage_collect()
        samples = for _ <- 1..repeat, do: time_us.(fun)

        %{
          size: name,
          bytes: nbytes,
          mode: mode,
          repeat: repeat,
          median_us: median.(samples),
          p90_us: pct.(samples, 0.9),
          min_us: Enum.min(samples)
        }
      end

    Tensor.free(reused)
    base = Enum.find(results, &(&1.mode == "shm_reused")).median_us
    Enum.map(results, &Map.put(&1, :vs_shm_reused, &1.median_us / base))
  end
  |> List.flatten()

Sidecar.stop(:bench)

if opts[:json] do
  IO.puts(
    "{\"benchmark\": \"elixir_port_roundtrip\", \"op\": \"identity\", \"dtype\": \"float32\", \"rows\": [" <>
      Enum.map_join(rows, ", ", fn r ->
        "{" <>
          Enum.map_join(r, ", ", fn
            {k, v} when is_binary(v) -> "\"#{k}\": \"#{v}\""
            {k, v} when is_float(v) -> "\"#{k}\": #{Float.round(v, 3)}"
            {k, v} -> "\"#{k}\": #{v}"
          end) <> "}"
      end) <> "]}"
  )
else
  IO.puts("Elixir -> sidecar (port transport) -> Elixir, identity on float32, one worker")

  IO.puts(
    String.pad_trailing("size", 7) <>
      String.pad_trailing("mode", 12) <>
      String.pad_leading("median ms", 11) <>
      String.pad_leading("p90 ms", 10) <>
      String.pad_leading("GB/s", 8) <> String.pad_leading("x shm_reused", 14)
  )

  for r <- rows do
    gbps =
      if r.mode == "shm_refs",
        do: "-",
        else: :erlang.float_to_binary(2 * r.bytes / (r.median_us * 1000), decimals: 2)

    IO.puts(
      String.pad_trailing(r.size, 7) <>
        String.pad_trailing(r.mode, 12) <>
        String.pad_leading(:erlang.float_to_binary(r.median_us / 1000, decimals: 3), 11) <>
        String.pad_leading(:erlang.float_to_binary(r.p90_us / 1000, decimals: 3), 10) <>
        String.pad_leading(gbps, 8) <>
        String.pad_leading(:erlang.float_to_binary(r.vs_shm_reused, decimals: 2), 14)
    )
  end
end
