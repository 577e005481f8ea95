defmodule Sidecar.ResourcesTest do
  # Resources and sessions from the BEAM, with the Python pool's guarantees: a model (the small MLP
  # of tests/resident_ops_module.py, its checkpoint saved by real torch) loaded in every worker,
  # outputs equal to the same model run in-process, replayed on a replacement before it serves;
  # session state kept across calls and :session_lost after a crash; structured loading errors.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Error, Telemetry, Tensor}

  @ops Path.expand("../../tests/resident_ops_module.py", __DIR__)
  @pool :resources_pool

  setup_all do
    dir = Path.join(System.tmp_dir!(), "sidecar-resources-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    python = System.get_env("SIDECAR_PYTHON")
    x = for i <- 1..8, do: i / 10

    # The checkpoint, and what the model computes for x, in a Python process of its own.
    script = """
    import sys, torch
    sys.path.insert(0, #{inspect(Path.dirname(@ops))})
    import resident_ops_module as m
    model, path = m.saved_mlp(#{inspect(dir)}, 5)
    with torch.inference_mode():
        y = model(torch.tensor(#{inspect(x)}, dtype=torch.float32).reshape(2, 4))
    print("RESULT", path, *y.flatten().tolist())
    """

    {out, 0} = System.cmd(python, ["-c", script])
    ["RESULT", path | ys] = out |> String.split("\n", trim: true) |> List.last() |> String.split(" ")
    y = Enum.map(ys, &String.to_float/1)

    {:ok, sup} = Sidecar.start_link(name: @pool, workers: 2, ops: [@ops], timeout: 30_000)
    Process.unlink(sup)
    :ok = Sidecar.await_ready(@pool, :all, 60_000)

    on_exit(fn ->
      Sidecar.stop(@pool)
      File.rm_rf!(dir)
    end)

    %{checkpoint: path, x: Tensor.from_binary!(floats(x), "float32", [2, 4]), y: y}
  end

  setup do
    test = self()
    id = {__MODULE__, make_ref()}

    events = [[:sidecar, :resource, :restored], [:sidecar, :resource, :restore_failed], [:sidecar, :worker, :ready],
              [:sidecar, :pool, :crash]]

    :ok = Telemetry.attach_many(id, events, fn e, m, md, _ -> send(test, {:event, e, m, md}) end, nil)

    on_exit(fn ->
      Telemetry.detach(id)
      for r <- Sidecar.resources(@pool), do: Sidecar.unload(@pool, r.name)
    end)
  end

  defp forward(x) do
    {:ok, %Sidecar.Result{outputs: [out]}} = Sidecar.call(@pool, "mlp_forward", [x])
    to_floats(Tensor.to_binary!(out))
  end

  defp close?(a, b), do: Enum.zip(a, b) |> Enum.all?(fn {p, q} -> abs(p - q) < 1.0e-5 end)

  test "a model loaded in every worker computes what it computes in-process, and comes back after SIGKILL",
       %{checkpoint: ckpt, x: x, y: y} do
    assert {:ok, infos} = Sidecar.load(@pool, "mlp", "test_mlp", args: [checkpoint: ckpt])
    assert length(infos) == 2 and Enum.all?(infos, &(&1.device == "cpu" and &1.host_bytes >= 0))
    assert Enum.sort(Enum.map(infos, & &1.os_pid)) == Enum.sort(Enum.map(Sidecar.status(@pool), & &1.os_pid))
    for _ <- 1..4, do: assert(close?(forward(x), y))
    assert [%{name: "mlp", loader: "test_mlp"}] = Sidecar.resources(@pool)

    [%{os_pid: victim} | _] = Sidecar.status(@pool)
    System.cmd("kill", ["-KILL", "#{victim}"])
    assert_receive {:event, [:sidecar, :pool, :crash], _, %{os_pid: ^victim}}, 10_000
    # The replacement restores the model, and only then is it ready (routable).
    assert_receive {:event, [:sidecar, :resource, :restored], %{duration: d}, %{resources: ["mlp"], os_pid: fresh}}, 30_000
    assert d > 0
    assert_receive {:event, [:sidecar, :worker, :ready], _, %{os_pid: ^fresh, restart: true}}, 30_000
    assert :ok = Sidecar.await_ready(@pool, :all, 30_000)
    for _ <- 1..6, do: assert(close?(forward(x), y))

    assert {:ok, %{workers: 2}} = Sidecar.unload(@pool, "mlp")
    assert Sidecar.resources(@pool) == []
    assert {:error, %Error{kind: :resource_failed, cause: "not_loaded"}} = Sidecar.unload(@pool, "mlp")
  end

  test "loading errors are structured and leave nothing loaded", %{checkpoint: ckpt} do
    assert {:error, %Error{kind: :resource_failed, cause: "unknown_loader", close_names: close}} =
             Sidecar.load(@pool, "x", "test_mpl")
    assert "test_mlp" in close

    assert {:error, %Error{kind: :resource_failed, cause: "loader_failed", exception_type: "FileNotFoundError"}} =
             Sidecar.load(@pool, "x", "failing")

    assert {:error, %Error{kind: :resource_failed, cause: "missing_checkpoint", resource: "x"}} =
             Sidecar.load(@pool, "x", "test_mlp", args: [checkpoint: ckpt <> ".missing"])

    assert {:error, %Error{kind: :resource_failed, cause: "unknown_architecture"}} =
             Sidecar.load(@pool, "x", "by_architecture", args: [architecture: "nope", checkpoint: ckpt])

    assert {:error, %Error{kind: :resource_failed, cause: "not_loaded", resource: "mlp"}} =
             Sidecar.call(@pool, "mlp_forward", [Tensor.from_binary!(floats([0, 0, 0, 0]), "float32", [1, 4])])

    assert Sidecar.resources(@pool) == []
  end

  test "session state persists across calls; :session_lost follows a crash of its worker" do
    one = Tensor.from_binary!(floats([1.0]), "float32", [1])
    {:ok, s} = Sidecar.session(@pool)
    assert {:ok, %{outputs: [a], os_pid: pid}} = Sidecar.call(s, "kv_append", [one])
    assert {:ok, %{outputs: [b], os_pid: ^pid}} = Sidecar.call(s, "kv_append", [one])
    assert to_floats(Tensor.to_binary!(a)) == [1.0] and to_floats(Tensor.to_binary!(b)) == [1.0, 1.0]
    assert pid == s.os_pid

    System.cmd("kill", ["-KILL", "#{pid}"])
    assert_receive {:event, [:sidecar, :pool, :crash], _, %{os_pid: ^pid}}, 10_000
    sync_workers(@pool)

    for _ <- 1..2 do
      assert {:error, %Error{kind: :session_lost, session_id: id, classification: :killed, pid: ^pid}} =
               Sidecar.call(s, "kv_append", [one])

      assert id == s.id
    end

    :ok = Sidecar.await_ready(@pool, :all, 30_000)
    {:ok, fresh} = Sidecar.session(@pool)
    assert {:ok, %{outputs: [c]}} = Sidecar.call(fresh, "kv_append", [one])
    assert to_floats(Tensor.to_binary!(c)) == [1.0]
    assert :ok = Sidecar.close_session(fresh)
  end
end

defmodule Sidecar.ErrorFieldKeysTest do
  # A field of a worker's error whose atom the VM did not have yet when the frame was decoded
  # (Sidecar.Frame creates no atoms) arrives as a binary key: it is still that field.
  use ExUnit.Case
  alias Sidecar.Error

  test "known fields given as binary keys land in their struct fields; unknown ones stay details" do
    err = Error.from_term(%{:kind => :resource_failed, "close_names" => ["test_mlp"], "not_a_field" => 1})
    assert %Error{kind: :resource_failed, close_names: ["test_mlp"], details: %{"not_a_field" => 1}} = err
  end
end
