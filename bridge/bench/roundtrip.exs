# Round trip of a float32 tensor from Elixir through a sidecar worker (identity) and back, side by
# side per size, one worker, the port transport:
#
#   binary_copy          :binary.copy/1 of the same bytes: one memcpy, the floor
#   nif_alloc_write_alias  the NIF: Tensor.write/3 into a segment made once by alloc/3 (one copy),
#                        identity with alias_inputs (the output is that segment), Tensor.view/1 of
#                        the result: one copy in all
#   nif_alloc_write      the same without alias: the worker copies the input into its arena, the
#                        result is a zero-copy binary of that arena block (leased until GC)
#   nif_from_binary      the NIF: Tensor.from_binary/3 (a fresh segment, one copy) + a zero-copy result
#   nif_zero_copy_input  the previous call's result binary is the input (from_binary/3 finds it in
#                        shared memory: no copy by the VM) + a zero-copy result
#   descriptors_only     the input already in a segment, identity with alias_inputs: nobody copies
#   file_path            what the bridge does without the NIF: pwrite into a reused segment, the
#                        output read back with pread (read: false + Sidecar.Shm.read/3), lease released
#   inline               the same bytes inside the {:packet, 4} port messages both ways
#
# Every mode's result is checked byte for byte once per size. With --replace N it also kills a
# worker of a 2-worker pool N times and measures how long until its replacement is ready (forked
# from the template; with --spare N a warm spare takes over; with --cold M started cold), and the
# memory (RSS, PSS) of the template and the workers.
#
# Run from bridge/: mix run bench/roundtrip.exs [--json] [--sizes 1MB,100MB,1GB] [--repeat N]
#   [--modes a,b] [--replace N] [--spare N] [--cold M]
# SIDECAR_PYTHON names the interpreter with the sidecar package (default ../.venv/bin/python).

alias Sidecar.{Native, Shm, Tensor}

{opts, _, _} =
  OptionParser.parse(System.argv(),
    strict: [
      json: :boolean,
      sizes: :string,
      repeat: :integer,
      modes: :string,
      replace: :integer,
      cold: :integer,
      spare: :integer
    ]
  )

sizes_by_name = %{"1MB" => 1_000_000, "10MB" => 10_000_000, "100MB" => 100_000_000, "1GB" => 1_000_000_000}
sizes = String.split(Keyword.get(opts, :sizes, "1MB,100MB"), ",")
python = System.get_env("SIDECAR_PYTHON") || Path.expand("../.venv/bin/python", File.cwd!())
System.put_env("SIDECAR_PYTHON", python)
Native.loaded?() || raise "the NIF is not loaded: #{inspect(Native.status())}"

all_modes =
  ~w(binary_copy nif_alloc_write_alias nif_alloc_write nif_from_binary nif_zero_copy_input descriptors_only file_path inline)

modes_wanted = if opts[:modes], do: String.split(opts[:modes], ","), else: all_modes

{:ok, _} = Sidecar.start_link(name: :bench, workers: 1, telemetry: false, timeout: 600_000)
:ok = Sidecar.await_ready(:bench, :all, 120_000)

repeat_for = fn nbytes ->
  Keyword.get(opts, :repeat, cond do
    nbytes >= 500_000_000 -> 3
    nbytes >= 50_000_000 -> 10
    true -> 200
  end)
end

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

data_of = fn %Tensor{storage: {:data, bin}} -> bin end

rows =
  for name <- sizes do
    nbytes = Map.fetch!(sizes_by_name, name)
    n = div(nbytes, 4)
    data = :binary.copy(:rand.bytes(1_000_000), div(nbytes, 1_000_000))
    repeat = repeat_for.(nbytes)
    {:ok, seg} = Tensor.alloc("float32", [n])
    :ok = Tensor.write(seg, 0, data)

    # The worker hands the input segment back as its output: only descriptors cross.
    alias_view = fn ->
      {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [seg], alias_inputs: true)
      {:ok, view} = Tensor.view(out)
      view
    end

    modes = [
      {"binary_copy", fn -> :binary.copy(data) end},
      {"nif_alloc_write_alias",
       fn ->
         :ok = Tensor.write(seg, 0, data)
         alias_view.()
       end},
      {"nif_alloc_write",
       fn ->
         :ok = Tensor.write(seg, 0, data)
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [seg])
         data_of.(out)
       end},
      {"nif_from_binary",
       fn ->
         t = Tensor.from_binary!(data, "float32", [n])
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [t])
         Tensor.free(t)
         data_of.(out)
       end},
      {"nif_zero_copy_input",
       fn ->
         # The chained input: always the latest result (the first one from the segment).
         input =
           Process.get(:chain) ||
             data_of.(hd(elem(Sidecar.call(:bench, "identity", [seg]), 1).outputs))

         t = Tensor.from_binary!(input, "float32", [n])
         {:shm, _} = t.storage
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [t])
         Process.put(:chain, data_of.(out))
         Process.get(:chain)
       end},
      {"descriptors_only", alias_view},
      {"file_path",
       fn ->
         {:shm, %{name: seg_name}} = seg.storage
         :ok = Shm.write(seg_name, 0, data)
         {:ok, r} = Sidecar.call(:bench, "identity", [%{seg | mapping: nil}], read: false)
         [%Tensor{storage: {:shm, out}}] = r.outputs
         {:ok, bin} = Shm.read(out.name, out.offset, out.nbytes)
         Sidecar.release(r)
         bin
       end},
      {"inline",
       fn ->
         t = Tensor.from_binary!(data, "float32", [n], inline: true)
         {:ok, %{outputs: [out]}} = Sidecar.call(:bench, "identity", [t], placement: :inline)
         data_of.(out)
       end}
    ]

    results =
      for {mode, fun} <- modes, mode in modes_wanted do
        back = fun.()
        if back != data, do: raise("#{mode} #{name}: bytes differ after the round trip")
        back = nil
        _ = back
        for _ <- 1..min(2, repeat), do: fun.()
        :erlang.garbage_collect()

        # A collection between samples (not timed): each result is dropped before the next call,
        # as in a loop that uses it and moves on (its lease goes back, its memory is freed).
        samples =
          for _ <- 1..repeat do
            us = time_us.(fun)
            :erlang.garbage_collect()
            us
          end

        %{
          size: name,
          bytes: nbytes,
          mode: mode,
          repeat: repeat,
          median_us: median.(samples),
          p90_us: pct.(samples, 0.9),
          min_us: Enum.min(samples)
        }
        |> tap(fn _ ->
          # Nothing of one mode stays for the next: a 1 GB run holds a few GiB at a time, no more.
          Process.delete(:chain)
          :erlang.garbage_collect()
        end)
      end

    Tensor.free(seg)
    :erlang.garbage_collect()
    base = Enum.find(results, &(&1.mode == "binary_copy"))
    Enum.map(results, &Map.put(&1, :vs_memcpy, if(base, do: &1.median_us / base.median_us, else: nil)))
  end
  |> List.flatten()

Sidecar.stop(:bench)

# -- replacement --------------------------------------------------------------------------------------

kb = fn file, key ->
  with {:ok, text} <- File.read(file), [_, v] <- Regex.run(~r/^#{key}:\s+(\d+) kB$/m, text) do
    String.to_integer(v) * 1024
  else
    _ -> 0
  end
end

replacement = fn pool_opts, times ->
  test = self()
  id = make_ref()

  :ok =
    Sidecar.Telemetry.attach(id, [:sidecar, :worker, :ready], fn _, m, md, _ -> send(test, {:ready, m, md}) end, nil)

  {:ok, _} = Sidecar.start_link([name: :bench_replace, workers: 2, telemetry: false] ++ pool_opts)
  :ok = Sidecar.await_ready(:bench_replace, :all, 120_000)
  spares = Keyword.get(pool_opts, :spares, 0)

  await_spare = fn ->
    if spares > 0 do
      receive do
        {:ready, _, %{slot: {:spare, _}}} -> :ok
      after
        120_000 -> raise "no spare within 120 s"
      end
    end
  end

  await_spare.()

  memory =
    Enum.map(Sidecar.status(:bench_replace), fn w ->
      %{rss: kb.("/proc/#{w.os_pid}/status", "VmRSS"), pss: kb.("/proc/#{w.os_pid}/smaps_rollup", "Pss")}
    end)

  template = Sidecar.info(:bench_replace).template

  template_mem =
    if template.os_pid && template.status == :ready,
      do: %{rss: kb.("/proc/#{template.os_pid}/status", "VmRSS"), pss: kb.("/proc/#{template.os_pid}/smaps_rollup", "Pss")},
      else: nil

  samples =
    for _ <- 1..times do
      # Drain ready events of earlier starts.
      receive do
        {:ready, _, _} -> :ok
      after
        0 -> :ok
      end

      [%{os_pid: victim, slot: slot} | _] = Enum.filter(Sidecar.status(:bench_replace), &is_integer(&1.slot))
      t0 = System.monotonic_time()
      System.cmd("kill", ["-KILL", "#{victim}"])

      receive do
        {:ready, %{since_exit: since}, %{slot: ^slot, restart: true, via: via}} ->
          a = Sidecar.Tensor.from_binary!(<<1.0::float-32-native>>, "float32", [1])
          {:ok, _} = Sidecar.call(:bench_replace, "add", [a, a])
          served = System.monotonic_time()
          # The next kill finds a spare again (the one that took over is a slot's worker now).
          await_spare.()

          %{
            via: via,
            exit_to_ready_ms: System.convert_time_unit(since, :native, :microsecond) / 1000,
            kill_to_served_ms: System.convert_time_unit(served - t0, :native, :microsecond) / 1000
          }
      after
        120_000 -> raise "no replacement within 120 s"
      end
    end

  Sidecar.stop(:bench_replace)
  Sidecar.Telemetry.detach(id)
  %{samples: samples, workers: memory, template: template_mem}
end

replace_rows =
  for {label, pool_opts, times} <- [
        {"fork", [], opts[:replace] || 0},
        {"spare", [spares: 1], opts[:spare] || 0},
        {"cold", [template: false], opts[:cold] || 0}
      ],
      times > 0 do
    r = replacement.(pool_opts, times)
    ms = Enum.map(r.samples, & &1.exit_to_ready_ms)
    served = Enum.map(r.samples, & &1.kill_to_served_ms)

    %{
      mode: label,
      count: times,
      via: r.samples |> Enum.map(& &1.via) |> Enum.uniq() |> Enum.join("+"),
      median_ms: median.(ms),
      p90_ms: pct.(ms, 0.9),
      served_median_ms: median.(served),
      worker_rss_bytes: Enum.sum(Enum.map(r.workers, & &1.rss)),
      worker_pss_bytes: Enum.sum(Enum.map(r.workers, & &1.pss)),
      template_rss_bytes: if(r.template, do: r.template.rss, else: 0),
      template_pss_bytes: if(r.template, do: r.template.pss, else: 0)
    }
  end

json = fn rows ->
  "[" <>
    Enum.map_join(rows, ", ", fn r ->
      "{" <>
        Enum.map_join(r, ", ", fn
          {k, v} when is_binary(v) -> "\"#{k}\": \"#{v}\""
          {k, v} when is_float(v) -> "\"#{k}\": #{Float.round(v, 3)}"
          {k, nil} -> "\"#{k}\": null"
          {k, v} -> "\"#{k}\": #{v}"
        end) <> "}"
    end) <> "]"
end

if opts[:json] do
  IO.puts(
    "{\"benchmark\": \"elixir_port_roundtrip\", \"op\": \"identity\", \"dtype\": \"float32\", \"rows\": " <>
      json.(rows) <> ", \"replacement\": " <> json.(replace_rows) <> "}"
  )
else
  IO.puts("Elixir -> sidecar (port transport) -> Elixir, identity on float32, one worker")

  IO.puts(
    String.pad_trailing("size", 7) <>
      String.pad_trailing("mode", 23) <>
      String.pad_leading("median ms", 11) <> String.pad_leading("p90 ms", 10) <> String.pad_leading("x memcpy", 10)
  )

  for r <- rows do
    IO.puts(
      String.pad_trailing(r.size, 7) <>
        String.pad_trailing(r.mode, 23) <>
        String.pad_leading(:erlang.float_to_binary(r.median_us / 1000, decimals: 3), 11) <>
        String.pad_leading(:erlang.float_to_binary(r.p90_us / 1000, decimals: 3), 10) <>
        String.pad_leading(if(r.vs_memcpy, do: :erlang.float_to_binary(r.vs_memcpy, decimals: 2), else: "-"), 10)
    )
  end

  mb = fn b -> div(b, 1_048_576) end

  for r <- replace_rows do
    IO.puts(
      "replacement #{r.mode} (#{r.count}x, via #{r.via}): exit->ready median #{Float.round(r.median_ms, 1)} ms, " <>
        "p90 #{Float.round(r.p90_ms, 1)} ms; kill->first call served median #{Float.round(r.served_median_ms, 1)} ms; " <>
        "memory: workers RSS #{mb.(r.worker_rss_bytes)} MiB / PSS #{mb.(r.worker_pss_bytes)} MiB, template RSS " <>
        "#{mb.(r.template_rss_bytes)} MiB / PSS #{mb.(r.template_pss_bytes)} MiB"
    )
  end
end
