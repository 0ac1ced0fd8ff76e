// The eager entry's autograd node in C++ (bnfast/native.py builds and loads this file; bnfast/ops.py calls it).
//
// bnfast's eager forward and backward are Python (they replay launch plans: kernels/launch.py); what this file
// replaces is torch.autograd.Function's bookkeeping around them, which costs a layer of the MNIST model more host
// time per forward+backward than torch's whole F.batch_norm + relu (README "Host time"): THPFunction_apply's
// context object, argument scan and output wrapping, and PyNode's ctx.saved_tensors / needs_input_grad in the
// backward. Here the node is a plain C++ torch::autograd::Node, like the nodes torch generates for its own ops:
//
//   apply(forward, backward, x, weight, bias, residual, inputs) -> y
//     y, saved, state = forward(inputs)   (grad mode off; saved: a tuple of tensors or None; state: any object)
//     then, when grad mode is on and x, weight, bias or residual requires grad, y's grad_fn is a
//     BatchNormBackward node whose next edges are those four inputs' (None: no edge), holding `saved` as
//     SavedVariables (version counters checked, saved-tensor hooks applied, freed after a backward without
//     retain_graph, exactly as for torch's own nodes) and `state`.
//     Returns NotImplemented, before calling forward, when one of the four inputs carries a forward-mode
//     gradient (dual tensors): the caller then takes torch.autograd.Function, which raises torch's error.
//   BatchNormBackward: (dx, dweight, dbias, dresidual) = backward(state, needs, dy, *saved)
//     needs: a tuple of four bools (the input has an edge: its gradient is wanted), dy: y's gradient (zeros when
//     the engine hands an undefined one, as torch.autograd.Function materialises it); None: no gradient.
//
//
// The call cache (bnfast/ops.py "call cache"): a module's whole eager forward and its backward replayed from C++.
//   init(globals)                      the Python objects whose state every replay checks (see `Globals`)
//   store(module, x, residual, spec)   remember module's last slow call (spec: bnfast.ops._call_spec)
//   forward(module, x, residual) -> y  that call again when everything it depended on is the same, else
//                                      NotImplemented (the caller then takes the slow path, and stores again)
//   The backward of a node made by `forward` replays the backward plan that the node's first slow backward
//   stored, under the same rule. A replay does what the slow path does, in the same order, with the same
//   arguments to the same compiled kernels: num_batches_tracked += k, the outputs allocated with the plan's
//   layouts, each launch through Triton's launcher as kernels/launch.py's `_direct` calls it, the node.
//
// Imports (includes): CPython, torch's autograd, dispatch and jit-tracer headers (no pybind11 module).
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <memory>
#include <string>

#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using NodePtr = decltype(Edge::function);  // std::shared_ptr<Node> (torch <= 2.12?) or c10::intrusive_ptr<Node>

constexpr int kInputs = 4;  // x, weight, bias, residual: the inputs that get gradients

struct Gil {  // the engine runs backward nodes without the GIL (and on CUDA, on its device threads)
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

[[noreturn]] void throw_python_error() {
  python_error error;
  error.persist();
  throw std::move(error);
}

// ------------------------------------------------------------------------------------------------ call cache
// Python objects are held as raw strong references and released under the GIL (entries die with nodes, which the
// engine may free on its own threads).
void decref_all(std::vector<PyObject*>& objects) {
  for (PyObject* o : objects) {
    Py_XDECREF(o);
  }
  objects.clear();
}

PyObject* hold(std::vector<PyObject*>& owned, PyObject* o) {
  Py_XINCREF(o);
  owned.push_back(o);
  return o;
}

// What a call compares of a tensor: none-ness, layout, dtype, device, sizes, strides.
struct Meta {
  bool none = true;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device{c10::kCPU};
  std::vector<int64_t> sizes, strides;

  static Meta of(const at::Tensor& t) {
    Meta m;
    m.none = false;
    m.dtype = t.scalar_type();
    m.device = t.device();
    m.sizes = t.sizes().vec();
    m.strides = t.strides().vec();
    return m;
  }
  bool matches(const at::Tensor& t) const {
    return !none && t.layout() == c10::kStrided && t.scalar_type() == dtype && t.device() == device &&
           t.sizes() == c10::IntArrayRef(sizes) && t.strides() == c10::IntArrayRef(strides);
  }
};

// A tensor the kernels may read as they did when the entry was stored: no functorch wrapper, batched tensor,
// Python subclass or functional tensor (their dispatch keys), strided.
bool plain_keys(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Python,
                                            c10::DispatchKey::Functionalize});
  return t.layout() == c10::kStrided && !t.key_set().has_any(wrapped);
}

// No functorch transform, TorchDispatchMode, TorchFunctionMode or jit trace is active: the slow path would route
// such calls elsewhere (torch's ops, the traced op), so the cache declines them.
bool plain_thread_state() {
  auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::Python) && !included.has(c10::DispatchKey::PythonTLSSnapshot) &&
         !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing();
}

// The Python objects whose state every replay checks (init): kernels/launch.py's module dict (DIRECT_LAUNCH,
// LAUNCH_PLANS, PLAN_OVERRIDE), the kernels module's dict (recorders swap kernels there), the launch module's
// _DRIVER list (active driver, get_current_device, set_current_device, get_current_stream), Triton's driver
// config (its _active), _GENERATION, Triton's runtime and compilation knobs, bnfast.ops._NATIVE, and the node's
// Python backward (bnfast.ops._native_backward).
struct Globals {
  PyObject *launch_dict = nullptr, *kernels_dict = nullptr, *driver = nullptr, *driver_config = nullptr,
           *generation = nullptr, *runtime_knobs = nullptr, *compilation_knobs = nullptr, *native = nullptr,
           *backward = nullptr;
  PyObject *s_direct, *s_plans, *s_override, *s_active, *s_debug, *s_instrumentation, *s_enter, *s_exit;
} G;

struct Snapshot {  // the global state an entry was stored under
  PyObject *override_value = nullptr, *driver = nullptr, *debug = nullptr, *instrumentation = nullptr,
           *native = nullptr;
  long long generation = -1;
};

// getattr with a borrowed-like result: a new reference the caller owns (nullptr + error on failure)
bool take_snapshot(Snapshot& snap, std::vector<PyObject*>& owned) {
  snap.override_value = hold(owned, PyDict_GetItemWithError(G.launch_dict, G.s_override));
  snap.driver = hold(owned, PyList_GET_ITEM(G.driver, 0));
  PyObject* debug = PyObject_GetAttr(G.runtime_knobs, G.s_debug);
  PyObject* instrumentation = PyObject_GetAttr(G.compilation_knobs, G.s_instrumentation);
  if (debug == nullptr || instrumentation == nullptr) {
    Py_XDECREF(debug);
    Py_XDECREF(instrumentation);
    return false;
  }
  owned.push_back(debug);
  owned.push_back(instrumentation);
  snap.debug = debug;
  snap.instrumentation = instrumentation;
  snap.native = hold(owned, PyList_GET_ITEM(G.native, 0));
  snap.generation = PyLong_AsLongLong(PyList_GET_ITEM(G.generation, 0));
  return !PyErr_Occurred();
}

// -1: error set; 0: the state differs; 1: the same
int same_globals(const Snapshot& snap) {
  if (PyDict_GetItemWithError(G.launch_dict, G.s_direct) != Py_True ||
      PyDict_GetItemWithError(G.launch_dict, G.s_plans) != Py_True ||
      PyDict_GetItemWithError(G.launch_dict, G.s_override) != snap.override_value ||
      PyList_GET_ITEM(G.native, 0) != snap.native || PyList_GET_ITEM(G.driver, 0) != snap.driver ||
      PyLong_AsLongLong(PyList_GET_ITEM(G.generation, 0)) != snap.generation) {
    return PyErr_Occurred() ? -1 : 0;
  }
  PyObject* active = PyObject_GetAttr(G.driver_config, G.s_active);
  if (active == nullptr) {
    return -1;
  }
  Py_DECREF(active);
  if (active != snap.driver) {
    return 0;
  }
  int result = 1;
  for (auto [knobs, name, value] : {std::tuple{G.runtime_knobs, G.s_debug, snap.debug},
                                    std::tuple{G.compilation_knobs, G.s_instrumentation, snap.instrumentation}}) {
    PyObject* now = PyObject_GetAttr(knobs, name);
    if (now == nullptr) {
      return -1;
    }
    int equal = now == value ? 1 : PyObject_RichCompareBool(now, value, Py_EQ);
    Py_DECREF(now);
    if (equal != 1) {
      return equal;
    }
  }
  return result;
}

// One launch of a plan, as kernels/launch.py's `native_plan` exports it.
struct Step {
  PyObject *name, *kernel, *grid_x, *grid_y, *grid, *tail, *launcher, *function, *packed, *metadata;
  long device;
  std::vector<int> slots, unique;
};

struct Plan {
  std::vector<Meta> outputs;  // none: no such output
  std::vector<Step> steps;
};

// (layouts, steps) -> plan; false with an error set on a malformed export
bool parse_plan(PyObject* exported, Plan& plan, std::vector<PyObject*>& owned) {
  PyObject *layouts = nullptr, *steps = nullptr;
  if (!PyArg_ParseTuple(exported, "O!O!", &PyTuple_Type, &layouts, &PyTuple_Type, &steps)) {
    return false;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(layouts); ++i) {
    PyObject* layout = PyTuple_GET_ITEM(layouts, i);
    Meta m;
    if (layout != Py_None) {
      PyObject *sizes, *strides, *dtype;
      if (!PyArg_ParseTuple(layout, "OOO", &sizes, &strides, &dtype) || !THPDtype_Check(dtype)) {
        PyErr_SetString(PyExc_TypeError, "store: a layout is (sizes, strides, dtype)");
        return false;
      }
      m.none = false;
      m.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
      for (auto [source, target] : {std::pair{sizes, &m.sizes}, std::pair{strides, &m.strides}}) {
        PyObject* seq = PySequence_Fast(source, "store: sizes and strides are sequences");
        if (seq == nullptr) {
          return false;
        }
        for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); ++k) {
          target->push_back(PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, k)));
        }
        Py_DECREF(seq);
      }
    }
    plan.outputs.push_back(std::move(m));
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(steps); ++i) {
    Step st;
    PyObject *slots, *unique;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(steps, i), "OOOOOlO!O!O!OOOO", &st.name, &st.kernel, &st.grid_x,
                          &st.grid_y, &st.grid, &st.device, &PyTuple_Type, &slots, &PyTuple_Type, &unique,
                          &PyTuple_Type, &st.tail, &st.launcher, &st.function, &st.packed, &st.metadata)) {
      return false;
    }
    for (PyObject* o : {st.name, st.kernel, st.grid_x, st.grid_y, st.grid, st.tail, st.launcher, st.function,
                        st.packed, st.metadata}) {
      hold(owned, o);
    }
    for (auto [source, target] : {std::pair{slots, &st.slots}, std::pair{unique, &st.unique}}) {
      for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(source); ++k) {
        target->push_back(static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(source, k))));
      }
    }
    plan.steps.push_back(std::move(st));
  }
  return !PyErr_Occurred();
}

// Allocate `plan`'s outputs like `like`, append them to `table`; then launch every step (after checking, for all
// of them, the kernels module still holds their kernel and their pointers are 16-byte aligned, as `_Plan.run`
// does, and that the current device is theirs), `counter += increment` first when a counter is given: -1 error
// set, 0 declined (nothing launched, the counter unchanged), 1 launched.
int replay(const Plan& plan, std::vector<PyObject*>& table, const at::Tensor& like, PyObject* counter = nullptr,
           long long increment = 0) {
  for (const Meta& m : plan.outputs) {
    if (m.none) {
      Py_INCREF(Py_None);
      table.push_back(Py_None);
    } else {
      table.push_back(THPVariable_Wrap(at::empty_strided(m.sizes, m.strides, like.options().dtype(m.dtype))));
    }
  }
  long device = plan.steps.empty() ? -1 : plan.steps[0].device;
  for (const Step& st : plan.steps) {
    if (PyDict_GetItemWithError(G.kernels_dict, st.name) != st.kernel || st.device != device) {
      return PyErr_Occurred() ? -1 : 0;
    }
    for (int slot : st.unique) {
      PyObject* t = table[slot];
      if (!THPVariable_Check(t) || (reinterpret_cast<uintptr_t>(THPVariable_Unpack(t).data_ptr()) & 15) != 0) {
        return 0;
      }
    }
  }
  PyObject* current = PyObject_CallNoArgs(PyList_GET_ITEM(G.driver, 1));
  if (current == nullptr) {
    return -1;
  }
  long current_device = PyLong_AsLong(current);
  Py_DECREF(current);
  if (current_device != device) {
    return PyErr_Occurred() ? -1 : 0;  // the slow path switches devices
  }
  if (counter != nullptr && increment != 0) {  // the module's num_batches_tracked += k, after the checks pass
    if (!THPVariable_Check(counter)) {
      return 0;
    }
    THPVariable_Unpack(counter).add_(increment);
  }
  PyObject* device_obj = PyLong_FromLong(device);
  PyObject* stream = device_obj ? PyObject_CallOneArg(PyList_GET_ITEM(G.driver, 3), device_obj) : nullptr;
  Py_XDECREF(device_obj);
  PyObject* enter = stream ? PyObject_GetAttr(G.runtime_knobs, G.s_enter) : nullptr;
  PyObject* exit = enter ? PyObject_GetAttr(G.runtime_knobs, G.s_exit) : nullptr;
  int result = exit != nullptr ? 1 : -1;
  std::vector<PyObject*> args;
  for (size_t i = 0; result == 1 && i < plan.steps.size(); ++i) {
    const Step& st = plan.steps[i];
    Py_ssize_t n_tail = PyTuple_GET_SIZE(st.tail);
    args.assign(9, nullptr);
    args[0] = st.grid_x, args[1] = st.grid_y, args[2] = nullptr, args[3] = stream, args[4] = st.function;
    args[5] = st.packed, args[7] = enter, args[8] = exit;
    for (int slot : st.slots) {
      args.push_back(table[slot]);
    }
    for (Py_ssize_t k = 0; k < n_tail; ++k) {
      args.push_back(PyTuple_GET_ITEM(st.tail, k));
    }
    // launch_metadata(grid, stream, *args), then launcher(gx, gy, 1, stream, function, packed, metadata,
    // enter, exit, *args): `_direct`'s calls
    size_t n_args = args.size() - 9;
    std::vector<PyObject*> meta_args{st.grid, stream};
    meta_args.insert(meta_args.end(), args.begin() + 9, args.end());
    PyObject* metadata = PyObject_Vectorcall(st.metadata, meta_args.data(), meta_args.size(), nullptr);
    if (metadata == nullptr) {
      result = -1;
      break;
    }
    PyObject* one = PyLong_FromLong(1);
    args[2] = one;
    args[6] = metadata;
    PyObject* launched = one ? PyObject_Vectorcall(st.launcher, args.data(), 9 + n_args, nullptr) : nullptr;
    Py_XDECREF(one);
    Py_DECREF(metadata);
    if (launched == nullptr) {
      result = -1;
      break;
    }
    Py_DECREF(launched);
  }
  Py_XDECREF(stream);
  Py_XDECREF(enter);
  Py_XDECREF(exit);
  return result;
}

constexpr const char* kFields[] = {"training", "momentum", "eps", "track_running_stats", "activation",
                                   "virtual_batch_size"};
constexpr int kFieldCount = 6;
constexpr const char* kState[] = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"};
constexpr int kStateCount = 5;
PyObject* field_names[kFieldCount];
PyObject* state_names[kStateCount];
PyObject *s_parameters, *s_buffers;

// A module's last slow call, stored by `store`; shared with the nodes its replays made (their backward plan).
struct CallEntry {
  std::vector<PyObject*> owned;  // every strong reference below
  PyObject* module_ref = nullptr;
  PyObject* type = nullptr;
  PyObject* fields[kFieldCount] = {};
  PyObject* state_types[kStateCount] = {};
  Meta state_meta[kStateCount];
  Meta x, residual;
  Snapshot snap;
  long long increment = 0;  // num_batches_tracked += increment before the launches
  int sources[7] = {};      // the forward plan's inputs: -2 None, -1 x, 5 residual, 0..4 the module's state
  Plan forward;
  std::vector<int> saved;  // the node's saved tensors: table slots (-1: None)
  PyObject* state = nullptr;
  int y_slot = 7;
  // the backward, stored by the first slow backward of a node this entry made
  bool has_backward = false;
  Meta dy;
  Meta saved_meta[6];  // the backward plan's inputs after dy (x, weight, bias, mean, stat, residual) as unpacked
  bool needs[4] = {};
  bool dr_is_dy = false;
  Plan backward;
  std::vector<PyObject*> backward_owned;

  ~CallEntry() {
    if (Py_IsInitialized()) {
      Gil gil;
      decref_all(owned);
      decref_all(backward_owned);
    }
  }
};

long long counts[3] = {};  // forward replays, backward replays, stores (`stats`, for tests)
std::unordered_map<PyObject*, std::shared_ptr<CallEntry>> entries;  // module -> its entry (checked by weakref)
constexpr size_t kMaxEntries = 4096;

struct BatchNormBackward final : Node {
  std::vector<SavedVariable> saved;
  PyObject* backward = nullptr;  // strong references, released under the GIL
  PyObject* state = nullptr;
  std::shared_ptr<CallEntry> entry;  // set when a call-cache replay made this node

  ~BatchNormBackward() override {
    if ((backward != nullptr || state != nullptr) && Py_IsInitialized()) {
      Gil gil;
      Py_XDECREF(backward);
      Py_XDECREF(state);
    }
  }

  std::string name() const override { return "BatchNormBackward"; }

  void release_variables() override {
    for (auto& s : saved) {
      s.reset_data();
    }
  }

  // The entry's backward plan, replayed: -1 error set, 0 declined, 1 done (`out` filled).
  int replay_backward(const at::Tensor& dy, const std::vector<at::Tensor>& tensors, bool needs[kInputs],
                      variable_list& out) {
    const CallEntry& e = *entry;
    if (!e.has_backward || torch::autograd::GradMode::is_enabled() || !plain_thread_state() || !plain_keys(dy) ||
        !e.dy.matches(dy) || tensors.size() < 6) {
      return 0;
    }
    for (int i = 0; i < kInputs; ++i) {
      if (needs[i] != e.needs[i]) {
        return 0;
      }
    }
    // what the saved tensors unpacked to (a saved-tensor hook may return another layout than it was given)
    for (int i = 0; i < 6; ++i) {
      const at::Tensor& t = tensors[i];
      if (e.saved_meta[i].none ? t.defined() : (!t.defined() || !plain_keys(t) || !e.saved_meta[i].matches(t))) {
        return 0;
      }
    }
    int same = same_globals(e.snap);
    if (same != 1) {
      return same;
    }
    std::vector<PyObject*> table;
    table.push_back(THPVariable_Wrap(dy));
    for (int i = 0; i < 6; ++i) {
      table.push_back(THPVariable_Wrap(tensors[i]));  // undefined -> None
    }
    int done = replay(e.backward, table, tensors[0]);
    if (done == 1) {
      ++counts[1];
      for (int i = 0; i < kInputs; ++i) {
        PyObject* g = table[7 + i];
        if (g != Py_None) {
          out[i] = THPVariable_Unpack(g);
        }
      }
      if (e.dr_is_dy) {
        out[3] = dy;
      }
    }
    decref_all(table);
    return done;
  }

  variable_list apply(variable_list&& grads) override {
    at::Tensor dy = grads[0].defined() ? grads[0] : input_metadata(0).zeros_like();
    std::vector<at::Tensor> tensors;
    tensors.reserve(saved.size());
    for (auto& s : saved) {
      tensors.push_back(s.unpack());  // raises after a backward without retain_graph, or an in-place change
    }
    bool needs[kInputs];
    for (int i = 0; i < kInputs; ++i) {
      needs[i] = task_should_compute_output(i);
    }
    Gil gil;
    variable_list out(kInputs);
    if (entry) {
      int done = replay_backward(dy, tensors, needs, out);
      if (done == -1) {
        throw_python_error();
      }
      if (done == 1) {
        return out;
      }
    }
    std::vector<PyObject*> args;
    args.reserve(3 + tensors.size());
    args.push_back(state);
    PyObject* needs_tuple = PyTuple_New(kInputs);
    if (needs_tuple == nullptr) {
      throw_python_error();
    }
    for (int i = 0; i < kInputs; ++i) {
      PyObject* flag = needs[i] ? Py_True : Py_False;
      Py_INCREF(flag);
      PyTuple_SET_ITEM(needs_tuple, i, flag);
    }
    args.push_back(needs_tuple);
    args.push_back(THPVariable_Wrap(dy));
    for (auto& t : tensors) {
      args.push_back(THPVariable_Wrap(t));  // undefined -> None
    }
    PyObject* result = PyObject_Vectorcall(backward, args.data(), args.size(), nullptr);
    for (size_t i = 1; i < args.size(); ++i) {
      Py_XDECREF(args[i]);
    }
    if (result == nullptr) {
      throw_python_error();
    }
    // (dx, dweight, dbias, dresidual[, backward spec]): the spec ((layouts, steps), dr_is_dy) when the kernels'
    // backward plan ran with every launch direct (bnfast.ops._native_backward), for this node's entry
    bool ok = PyTuple_Check(result) && (PyTuple_GET_SIZE(result) == kInputs || PyTuple_GET_SIZE(result) == 5);
    for (int i = 0; ok && i < kInputs; ++i) {
      PyObject* g = PyTuple_GET_ITEM(result, i);
      if (g == Py_None) {
        continue;
      }
      ok = THPVariable_Check(g);
      if (ok) {
        out[i] = THPVariable_Unpack(g);
      }
    }
    if (ok && entry && !entry->has_backward && PyTuple_GET_SIZE(result) == 5 &&
        PyTuple_GET_ITEM(result, 4) != Py_None) {
      PyObject *exported, *dr_is_dy;
      CallEntry& e = *entry;
      e.backward = Plan();
      if (PyArg_ParseTuple(PyTuple_GET_ITEM(result, 4), "OO", &exported, &dr_is_dy) &&
          parse_plan(exported, e.backward, e.backward_owned)) {
        e.dy = Meta::of(dy);
        for (int i = 0; i < 6 && i < static_cast<int>(tensors.size()); ++i) {
          e.saved_meta[i] = tensors[i].defined() ? Meta::of(tensors[i]) : Meta();
        }
        std::copy(needs, needs + kInputs, e.needs);
        e.dr_is_dy = dr_is_dy == Py_True;
        e.has_backward = true;
      } else {
        Py_DECREF(result);
        throw_python_error();
      }
    }
    Py_DECREF(result);
    TORCH_CHECK(ok, "bnfast: the backward must return a tuple of 4 tensors or None");
    return out;
  }
};

NodePtr new_node() {
#if defined(BNFAST_SHARED_NODE_PTR)
  return NodePtr(new BatchNormBackward(), torch::autograd::deleteNode);
#else
  return c10::make_intrusive<BatchNormBackward>();
#endif
}

// y's grad_fn: a node over the four inputs' edges, saving `saved` (tensors or None), holding `state`, `backward`.
void attach_node(const at::Tensor (&inputs)[kInputs], const at::Tensor& y, const std::vector<PyObject*>& saved,
                 PyObject* state, PyObject* backward, std::shared_ptr<CallEntry> entry) {
  NodePtr node = new_node();
  auto* bn = static_cast<BatchNormBackward*>(node.get());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs[0], inputs[1], inputs[2], inputs[3]));
  bn->saved.reserve(saved.size());
  for (PyObject* t : saved) {
    bn->saved.emplace_back(t == Py_None ? at::Tensor() : THPVariable_Unpack(t), /*is_output=*/false);
  }
  bn->backward = backward;
  Py_INCREF(backward);
  bn->state = state;
  Py_INCREF(state);
  bn->entry = std::move(entry);
  torch::autograd::set_history(y, node);
}

PyObject* apply(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 + kInputs) {
    PyErr_SetString(PyExc_TypeError, "apply(forward, backward, x, weight, bias, residual, inputs)");
    return nullptr;
  }
  at::Tensor inputs[kInputs];
  bool requires_grad = false;
  for (int i = 0; i < kInputs; ++i) {
    PyObject* o = args[2 + i];
    if (o == Py_None) {
      continue;
    }
    if (!THPVariable_Check(o)) {
      PyErr_SetString(PyExc_TypeError, "apply: x, weight, bias and residual must be tensors or None");
      return nullptr;
    }
    inputs[i] = THPVariable_Unpack(o);
    if (torch::autograd::isFwGradDefined(inputs[i])) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    requires_grad = requires_grad || inputs[i].requires_grad();
  }
  requires_grad = requires_grad && torch::autograd::GradMode::is_enabled();
  PyObject* out = nullptr;
  {
    torch::autograd::AutoGradMode no_grad(false);
    out = PyObject_CallOneArg(args[0], args[2 + kInputs]);
  }
  if (out == nullptr) {
    return nullptr;
  }
  if (!PyTuple_Check(out) || PyTuple_GET_SIZE(out) != 3 || !THPVariable_Check(PyTuple_GET_ITEM(out, 0)) ||
      !PyTuple_Check(PyTuple_GET_ITEM(out, 1))) {
    Py_DECREF(out);
    PyErr_SetString(PyExc_TypeError, "apply: forward must return (y, a tuple of tensors or None, state)");
    return nullptr;
  }
  PyObject* y = PyTuple_GET_ITEM(out, 0);
  Py_INCREF(y);
  if (requires_grad) {
    PyObject* saved = PyTuple_GET_ITEM(out, 1);
    std::vector<PyObject*> tensors(&PyTuple_GET_ITEM(saved, 0), &PyTuple_GET_ITEM(saved, 0) + PyTuple_GET_SIZE(saved));
    attach_node(inputs, THPVariable_Unpack(y), tensors, PyTuple_GET_ITEM(out, 2), args[1], nullptr);
  }
  Py_DECREF(out);
  return y;
  END_HANDLE_TH_ERRORS
}

// init(launch_dict, kernels_dict, driver, driver_config, generation, runtime_knobs, compilation_knobs, native,
//      backward): see `Globals`
PyObject* init(PyObject* /*module*/, PyObject* args) {
  Globals g = G;
  if (!PyArg_ParseTuple(args, "O!O!O!OO!OOO!O", &PyDict_Type, &g.launch_dict, &PyDict_Type, &g.kernels_dict,
                        &PyList_Type, &g.driver, &g.driver_config, &PyList_Type, &g.generation, &g.runtime_knobs,
                        &g.compilation_knobs, &PyList_Type, &g.native, &g.backward)) {
    return nullptr;
  }
  if (PyList_GET_SIZE(g.driver) < 4 || PyList_GET_SIZE(g.generation) < 1 || PyList_GET_SIZE(g.native) < 1) {
    PyErr_SetString(PyExc_ValueError, "init: _DRIVER holds 4 items, _GENERATION and _NATIVE one");
    return nullptr;
  }
  for (PyObject* o : {g.launch_dict, g.kernels_dict, g.driver, g.driver_config, g.generation, g.runtime_knobs,
                      g.compilation_knobs, g.native, g.backward}) {
    Py_INCREF(o);  // held for the process's life
  }
  g.s_direct = PyUnicode_InternFromString("DIRECT_LAUNCH");
  g.s_plans = PyUnicode_InternFromString("LAUNCH_PLANS");
  g.s_override = PyUnicode_InternFromString("PLAN_OVERRIDE");
  g.s_active = PyUnicode_InternFromString("_active");
  g.s_debug = PyUnicode_InternFromString("debug");
  g.s_instrumentation = PyUnicode_InternFromString("instrumentation_mode");
  g.s_enter = PyUnicode_InternFromString("launch_enter_hook");
  g.s_exit = PyUnicode_InternFromString("launch_exit_hook");
  for (int i = 0; i < kFieldCount; ++i) {
    field_names[i] = PyUnicode_InternFromString(kFields[i]);
  }
  for (int i = 0; i < kStateCount; ++i) {
    state_names[i] = PyUnicode_InternFromString(kState[i]);
  }
  s_parameters = PyUnicode_InternFromString("_parameters");
  s_buffers = PyUnicode_InternFromString("_buffers");
  G = g;
  entries.clear();
  Py_RETURN_NONE;
}

// The module's instance dict, its _parameters and _buffers, and its five state objects as `_state` reads them
// (nullptr where a name is missing: the caller declines). False with an error set on failure.
bool read_module(PyObject* module, PyObject*& dict, PyObject* (&state)[kStateCount]) {
  PyObject** dict_ptr = _PyObject_GetDictPtr(module);
  dict = dict_ptr != nullptr ? *dict_ptr : nullptr;
  for (auto& s : state) {
    s = nullptr;
  }
  if (dict == nullptr) {
    return true;
  }
  PyObject* params = PyDict_GetItemWithError(dict, s_parameters);
  PyObject* buffers = params ? PyDict_GetItemWithError(dict, s_buffers) : nullptr;
  if (params == nullptr || buffers == nullptr || !PyDict_Check(params) || !PyDict_Check(buffers)) {
    dict = nullptr;
    return !PyErr_Occurred();
  }
  for (int i = 0; i < kStateCount; ++i) {
    if (PyDict_GetItemWithError(dict, state_names[i]) != nullptr) {  // an instance attribute shadows it
      dict = nullptr;
      return !PyErr_Occurred();
    }
    state[i] = PyDict_GetItemWithError(i < 2 ? params : buffers, state_names[i]);
  }
  return !PyErr_Occurred();
}

// store(module, x, residual, spec): spec = (sources, increment, forward plan export, saved slots, state); see
// bnfast.ops._call_spec. Snapshots everything `forward` compares.
PyObject* store(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *module, *x, *residual, *spec, *sources, *exported, *saved;
  auto e = std::make_shared<CallEntry>();
  if (!PyArg_ParseTuple(args, "OO!OO", &module, THPVariableClass, &x, &residual, &spec) ||
      !PyArg_ParseTuple(spec, "O!LOO!O", &PyTuple_Type, &sources, &e->increment, &exported, &PyTuple_Type, &saved,
                        &e->state)) {
    return nullptr;
  }
  if (G.launch_dict == nullptr || PyTuple_GET_SIZE(sources) != 7) {
    PyErr_SetString(PyExc_RuntimeError, "store: init first; sources has 7 entries");
    return nullptr;
  }
  hold(e->owned, e->state);
  for (int i = 0; i < 7; ++i) {
    e->sources[i] = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(sources, i)));
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(saved); ++i) {
    e->saved.push_back(static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(saved, i))));
  }
  if (PyErr_Occurred() || !parse_plan(exported, e->forward, e->owned) || !take_snapshot(e->snap, e->owned)) {
    return nullptr;
  }
  PyObject* dict;
  PyObject* state[kStateCount];
  if (!read_module(module, dict, state)) {
    return nullptr;
  }
  if (dict == nullptr) {
    Py_RETURN_FALSE;
  }
  for (int i = 0; i < kFieldCount; ++i) {
    e->fields[i] = hold(e->owned, PyDict_GetItemWithError(dict, field_names[i]));
  }
  for (int i = 0; i < kStateCount; ++i) {
    if (state[i] == nullptr) {
      Py_RETURN_FALSE;
    }
    e->state_types[i] = hold(e->owned, reinterpret_cast<PyObject*>(Py_TYPE(state[i])));
    if (state[i] != Py_None) {
      if (!THPVariable_Check(state[i])) {
        Py_RETURN_FALSE;
      }
      e->state_meta[i] = Meta::of(THPVariable_Unpack(state[i]));
    }
  }
  e->type = hold(e->owned, reinterpret_cast<PyObject*>(Py_TYPE(module)));
  e->x = Meta::of(THPVariable_Unpack(x));
  if (residual != Py_None) {
    if (!THPVariable_CheckExact(residual)) {
      Py_RETURN_FALSE;
    }
    e->residual = Meta::of(THPVariable_Unpack(residual));
  }
  e->module_ref = PyWeakref_NewRef(module, nullptr);
  if (e->module_ref == nullptr) {
    return nullptr;
  }
  e->owned.push_back(e->module_ref);
  if (entries.size() >= kMaxEntries) {
    entries.clear();
  }
  entries[module] = std::move(e);
  ++counts[2];
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// forward(module, x, residual) -> y, or NotImplemented: see the top of this file.
PyObject* forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "forward(module, x, residual)");
    return nullptr;
  }
  PyObject *module = args[0], *x_obj = args[1], *residual_obj = args[2];
  auto found = entries.find(module);
  if (found == entries.end() || !THPVariable_CheckExact(x_obj)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  std::shared_ptr<CallEntry> entry = found->second;
  const CallEntry& e = *entry;
  if (PyWeakref_GetObject(e.module_ref) != module || reinterpret_cast<PyObject*>(Py_TYPE(module)) != e.type ||
      !plain_thread_state()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& x = THPVariable_Unpack(x_obj);
  if (!plain_keys(x) || !e.x.matches(x) || torch::autograd::isFwGradDefined(x)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  if (residual_obj == Py_None ? !e.residual.none
                              : (!THPVariable_CheckExact(residual_obj) || !plain_keys(THPVariable_Unpack(residual_obj)) ||
                                 !e.residual.matches(THPVariable_Unpack(residual_obj)) ||
                                 torch::autograd::isFwGradDefined(THPVariable_Unpack(residual_obj)))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  PyObject* dict;
  PyObject* state[kStateCount];
  if (!read_module(module, dict, state)) {
    return nullptr;
  }
  if (dict == nullptr) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  for (int i = 0; i < kFieldCount; ++i) {
    PyObject* value = PyDict_GetItemWithError(dict, field_names[i]);
    if (value != e.fields[i]) {
      if (PyErr_Occurred()) {
        return nullptr;
      }
      Py_RETURN_NOTIMPLEMENTED;
    }
  }
  for (int i = 0; i < kStateCount; ++i) {
    if (state[i] == nullptr || reinterpret_cast<PyObject*>(Py_TYPE(state[i])) != e.state_types[i]) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    if (state[i] != Py_None && (!e.state_meta[i].matches(THPVariable_Unpack(state[i])) ||
                                torch::autograd::isFwGradDefined(THPVariable_Unpack(state[i])))) {
      Py_RETURN_NOTIMPLEMENTED;
    }
  }
  int same = same_globals(e.snap);
  if (same != 1) {
    if (same == -1) {
      return nullptr;
    }
    Py_RETURN_NOTIMPLEMENTED;
  }
  // the forward plan's table: its inputs (x, weight, bias, running_mean, running_var, num_batches_tracked,
  // residual) from their sources, no object twice (a pointer's slot would be ambiguous), then its outputs
  std::vector<PyObject*> table;
  for (int source : e.sources) {
    PyObject* o = source == -1 ? x_obj : source == 5 ? residual_obj : source >= 0 ? state[source] : Py_None;
    if (o != Py_None && std::find(table.begin(), table.end(), o) != table.end()) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    table.push_back(o);
  }
  for (PyObject* o : table) {
    Py_INCREF(o);
  }
  int done = replay(e.forward, table, x, state[4], e.increment);
  if (done != 1) {
    decref_all(table);
    if (done == -1) {
      return nullptr;
    }
    Py_RETURN_NOTIMPLEMENTED;
  }
  ++counts[0];
  PyObject* y = table[e.y_slot];
  Py_INCREF(y);
  auto tensor_or_none = [](PyObject* o) { return o != Py_None ? THPVariable_Unpack(o) : at::Tensor(); };
  at::Tensor inputs[kInputs] = {x, tensor_or_none(table[1]), tensor_or_none(table[2]), tensor_or_none(table[6])};
  bool requires_grad = false;
  for (const auto& t : inputs) {
    requires_grad = requires_grad || (t.defined() && t.requires_grad());
  }
  if (requires_grad && torch::autograd::GradMode::is_enabled()) {
    std::vector<PyObject*> saved;
    for (int slot : e.saved) {
      saved.push_back(slot < 0 ? Py_None : table[slot]);
    }
    attach_node(inputs, THPVariable_Unpack(y), saved, e.state, G.backward, entry);
  }
  decref_all(table);
  return y;
  END_HANDLE_TH_ERRORS
}

PyObject* stats(PyObject* /*module*/, PyObject* /*args*/) {
  return Py_BuildValue("{sLsLsLsn}", "forward_replays", counts[0], "backward_replays", counts[1], "stores", counts[2],
                       "entries", static_cast<Py_ssize_t>(entries.size()));
}

PyMethodDef methods[] = {
    {"stats", stats, METH_NOARGS, "stats() -> the call cache's counts (tests)"},
    {"apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(apply)), METH_FASTCALL,
     "apply(forward, backward, x, weight, bias, residual, inputs) -> y (see bnfast/csrc/autograd_node.cpp)"},
    {"init", init, METH_VARARGS, "init(...): the globals every call-cache replay checks"},
    {"store", store, METH_VARARGS, "store(module, x, residual, spec) -> stored"},
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)), METH_FASTCALL,
     "forward(module, x, residual) -> y or NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_bnfast_autograd", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__bnfast_autograd() { return PyModule_Create(&module_def); }
