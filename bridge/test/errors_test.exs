defmodule Sidecar.ErrorsTest do
  # Errors from the worker arrive as %Sidecar.Error{} structs that match by kind, with their fields,
  # and the worker keeps serving.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Error, Tensor}

  test "a shape mismatch is matched as a struct with the shapes, the dimension and a suggestion" do
    a = Tensor.from_binary!(floats(Enum.map(1..6, &(&1 * 1.0))), "float32", [2, 3])
    b = Tensor.from_binary!(floats(Enum.map(1..6, &(&1 * 1.0))), "float32", [3, 2])

    assert {:error,
            %Error{
              kind: :shape_mismatch,
              op: "add",
              input_shapes: [[2, 3], [3, 2]],
              dim: 1,
              expected: "3",
              got: "2",
              suggestion: suggestion,
              request_id: "r-" <> _
            } = err} = Sidecar.call(pool(), "add", [a, b])

    assert suggestion =~ "transpose"
    assert Exception.message(err) =~ "shape_mismatch: add: shapes (2, 3) and (3, 2)"
    # The worker that answered is still there and serving.
    assert {:ok, %{outputs: [_]}} = Sidecar.call(pool(), "add", [a, a])
  end

  test "call! raises the same struct" do
    a = Tensor.from_binary!(floats([1.0, 2.0]), "float32", [2])
    b = Tensor.from_binary!(floats([1.0, 2.0, 3.0]), "float32", [3])
    err = assert_raise Error, fn -> Sidecar.call!(pool(), "mul", [a, b]) end
    assert err.kind == :shape_mismatch
  end

  test "an unknown op names the close ones" do
    assert {:error, %Error{kind: :unknown_op, op: "ad", close_names: close}} = Sidecar.call(pool(), "ad", [])
    assert "add" in close
  end

  test "a descriptor of a segment that does not exist is an invalid tensor ref naming the input" do
    bad = %Tensor{
      dtype: "float32",
      shape: [4],
      storage:
        {:shm, %{name: "/sc-#{Sidecar.Shm.run_id()}-1-00000000deadbeef", offset: 0, nbytes: 16, inode: 0}}
    }

    a = Tensor.from_binary!(floats([1.0, 2.0, 3.0, 4.0]), "float32", [4])

    assert {:error, %Error{kind: :invalid_tensor_ref, input_index: 1, field: "name"}} =
             Sidecar.call(pool(), "add", [a, bad])
  end

  test "a path outside the naming rule is refused by the worker" do
    bad = %Tensor{
      dtype: "uint8",
      shape: [4],
      storage: {:shm, %{name: "/../etc/passwd", offset: 0, nbytes: 4}}
    }

    assert {:error, %Error{kind: :invalid_tensor_ref, field: "name"}} =
             Sidecar.call(pool(), "identity", [bad])
  end

  test "a malformed value is an invalid argument, not a crash" do
    assert {:error, %Error{kind: :invalid_argument}} = Sidecar.call(pool(), "identity", [{:weird, 1, 2}])

    assert {:error, %Error{kind: :invalid_argument, field: "attrs"}} =
             Sidecar.call(pool(), "add", [1, 2], attrs: [nonsense: 1])

    assert {:ok, _} = Sidecar.call(pool(), "debug.pid", [])
  end

  test "a timeout cancels the call in the worker and comes back as :cancelled" do
    test = self()
    id = make_ref()
    rid = "cancel-test-#{System.unique_integer([:positive])}"

    :ok =
      Sidecar.Telemetry.attach(id, [:sidecar, :call, :exception], fn _, _, md, _ -> send(test, md) end, nil)

    try do
      assert {:error, %Error{kind: :cancelled, op: "debug.sleep"} = err} =
               Sidecar.call(pool(), "debug.sleep", [],
                 attrs: [seconds: 60.0],
                 timeout: 300,
                 request_id: rid
               )

      assert err.message =~ "timed out after 300 ms"
      # The worker stopped the 60 s sleep when it was told to cancel: its own end of the call says
      # so long before the sleep would have ended (this wait is far shorter than 60 s).
      assert_receive %{request_id: ^rid, kind: :cancelled, op: "debug.sleep"}, 20_000
    after
      Sidecar.Telemetry.detach(id)
    end
  end

  # SMALL_ATOM_UTF8_EXT: how a worker writes an atom (it may be one this VM never saw).
  defp etf_atom(text), do: [119, byte_size(text), text]

  test "worker frames never create atoms: unknown ones arrive as text, unknown kinds and classifications stay text" do
    fresh = "never_seen_#{System.unique_integer([:positive])}"
    # Loading the modules involved creates their own atoms: do it before counting.
    {:ok, _} = Sidecar.Frame.decode(IO.iodata_to_binary([131, 104, 1, etf_atom(fresh <> "_warm")]))
    _ = Error.from_term(%{kind: "x", classification: "y"})
    before = :erlang.system_info(:atom_count)

    # {:error, 7, %{kind: :<fresh>, message: "boom", <fresh>_field: 1, classification: "<fresh>"}}
    frame =
      IO.iodata_to_binary([
        131, 104, 3, etf_atom("error"), 97, 7, 116, <<4::32>>,
        etf_atom("kind"), etf_atom(fresh),
        etf_atom("message"), 109, <<4::32>>, "boom",
        etf_atom(fresh <> "_field"), 97, 1,
        etf_atom("classification"), 109, <<byte_size(fresh)::32>>, fresh
      ])

    assert {:ok, {:error, 7, term}} = Sidecar.Frame.decode(frame)
    assert term[:kind] == fresh and term[fresh <> "_field"] == 1
    err = Error.from_term(term)
    assert %Error{kind: :op_failed, message: "boom", classification: ^fresh} = err
    assert err.details == %{:kind => fresh, (fresh <> "_field") => 1}
    assert %Error{kind: :shape_mismatch, classification: :segfault} =
             Error.from_term(%{kind: "SHAPE_MISMATCH", message: "m", classification: "segfault"})

    assert :erlang.system_info(:atom_count) == before
    # A frame that needs the rewrite (an unknown atom) and holds what the protocol never carries
    # (a pid), and garbage: malformed, not exceptions.
    pid = :erlang.term_to_binary(self())
    frame = IO.iodata_to_binary([131, 104, 2, etf_atom(fresh <> "_tag"), binary_part(pid, 1, byte_size(pid) - 1)])
    assert {:error, :malformed} = Sidecar.Frame.decode(frame)
    assert {:error, :malformed} = Sidecar.Frame.decode(<<131, 200, 1, 2>>)
    assert :erlang.system_info(:atom_count) == before
  end

  test "a pool that does not exist is an error, not an exit" do
    assert {:error, %Error{kind: :invalid_argument}} = Sidecar.call(:no_such_pool, "add", [1, 2])
  end
end
