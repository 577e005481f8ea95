defmodule Sidecar.StreamTest do
  # Sidecar.stream/4 against a real worker running tests/stream_ops_module.py: chunks in order,
  # tensors, leaving early, the consumer dying, a worker crash and an op error mid-stream.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Error, Tensor}

  @pool :sidecar_stream_test_pool

  setup_all do
    ops = Path.expand("../tests/stream_ops_module.py", File.cwd!())
    start_own_pool(@pool, workers: 1, ops: [ops], timeout: 20_000)
  end

  setup do
    :ok = Sidecar.await_ready(@pool, :all, 60_000)
  end

  defp op_value(op) do
    {:ok, %{outputs: [value]}} = Sidecar.call(@pool, op, [])
    value
  end

  defp idle_and_leaseless? do
    s = op_value("worker_state")
    s["running"] == 0 and s["leases"] == 0
  end

  test "a generator of 1000 chunks arrives complete and in order" do
    assert Sidecar.stream(@pool, "count_up", [], attrs: [n: 1000]) |> Enum.to_list() == Enum.to_list(0..999)
  end

  test "tensor chunks come back as binaries, each lease handed back" do
    chunks = Sidecar.stream(@pool, "count_up", [], attrs: [n: 5, nbytes: 100_000]) |> Enum.to_list()
    assert length(chunks) == 5

    for {[i, %Tensor{} = t], k} <- Enum.with_index(chunks) do
      assert i == k and t.shape == [100_000] and t.dtype == "uint8"
      assert Tensor.to_binary(t) == {:ok, :binary.copy(<<i>>, 100_000)}
    end

    assert wait_until(&idle_and_leaseless?/0) == :ok
  end

  test "taking 10 chunks of an endless stream closes the generator and frees its chunks" do
    closed = op_value("stream_stats")["closed"]

    assert Sidecar.stream(@pool, "count_up", [], attrs: [n: 100_000, nbytes: 100_000])
           |> Enum.take(10)
           |> length() == 10

    assert wait_until(fn -> op_value("stream_stats")["closed"] == closed + 1 end) == :ok
    assert wait_until(&idle_and_leaseless?/0) == :ok
  end

  test "the consuming process dying stops the generator in the worker" do
    closed = op_value("stream_stats")["closed"]
    test = self()

    consumer =
      spawn(fn ->
        Sidecar.stream(@pool, "count_up", [], attrs: [n: 100_000]) |> Enum.each(&send(test, {:chunk, &1}))
      end)

    for k <- 0..9, do: assert_receive({:chunk, ^k}, 10_000)
    Process.exit(consumer, :kill)
    assert wait_until(fn -> op_value("stream_stats")["closed"] == closed + 1 end) == :ok
    assert wait_until(&idle_and_leaseless?/0) == :ok
  end

  test "an op error ends the stream with its structured error after the chunks before it" do
    test = self()

    err =
      try do
        Sidecar.stream(@pool, "ticks", [], attrs: [n: 10, fail_at: 3]) |> Enum.each(&send(test, {:chunk, &1}))
        nil
      rescue
        e in Error -> e
      end

    assert %Error{kind: :op_failed, exception_type: "ValueError"} = err
    for k <- 0..2, do: assert_received({:chunk, ^k})
    refute_received {:chunk, _}
  end

  test "a worker killed mid-stream ends it with worker_crashed after the delivered chunks" do
    test = self()

    consumer =
      spawn(fn ->
        try do
          Sidecar.stream(@pool, "ticks", [], attrs: [n: 100_000, every_s: 0.001])
          |> Enum.each(&send(test, {:chunk, &1}))
        rescue
          e in Error -> send(test, {:raised, e})
        end
      end)

    for k <- 0..4, do: assert_receive({:chunk, ^k}, 10_000)
    [%{os_pid: os_pid}] = Sidecar.status(@pool)
    Sidecar.OsProcess.signal(os_pid, :kill)
    assert_receive {:raised, %Error{kind: :worker_crashed, pid: ^os_pid}}, 10_000
    got = collect_chunks([])
    assert got == Enum.take(Stream.iterate(5, &(&1 + 1)), length(got))
    refute Process.alive?(consumer)
    assert :ok = Sidecar.await_ready(@pool, :all, 60_000)
  end

  defp collect_chunks(acc) do
    receive do
      {:chunk, k} -> collect_chunks(acc ++ [k])
    after
      0 -> acc
    end
  end
end
