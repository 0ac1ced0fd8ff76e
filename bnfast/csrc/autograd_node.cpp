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
// Imports (includes): CPython, torch's autograd headers (no pybind11 module: one METH_FASTCALL function).
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <type_traits>
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

struct BatchNormBackward final : Node {
  std::vector<SavedVariable> saved;
  PyObject* backward = nullptr;  // strong references, released under the GIL
  PyObject* state = nullptr;

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

  variable_list apply(variable_list&& grads) override {
    at::Tensor dy = grads[0].defined() ? grads[0] : input_metadata(0).zeros_like();
    std::vector<at::Tensor> tensors;
    tensors.reserve(saved.size());
    for (auto& s : saved) {
      tensors.push_back(s.unpack());  // raises after a backward without retain_graph, or an in-place change
    }
    Gil gil;
    std::vector<PyObject*> args;
    args.reserve(3 + tensors.size());
    args.push_back(state);
    PyObject* needs = PyTuple_New(kInputs);
    if (needs == nullptr) {
      throw_python_error();
    }
    for (int i = 0; i < kInputs; ++i) {
      PyObject* flag = task_should_compute_output(i) ? Py_True : Py_False;
      Py_INCREF(flag);
      PyTuple_SET_ITEM(needs, i, flag);
    }
    args.push_back(needs);
    args.push_back(THPVariable_Wrap(std::move(dy)));
    for (auto& t : tensors) {
      args.push_back(THPVariable_Wrap(std::move(t)));  // undefined -> None
    }
    PyObject* result = PyObject_Vectorcall(backward, args.data(), args.size(), nullptr);
    for (size_t i = 1; i < args.size(); ++i) {
      Py_XDECREF(args[i]);
    }
    if (result == nullptr) {
      throw_python_error();
    }
    variable_list out(kInputs);
    bool ok = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == kInputs;
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
    NodePtr node = new_node();
    auto* bn = static_cast<BatchNormBackward*>(node.get());
    node->set_next_edges(torch::autograd::collect_next_edges(inputs[0], inputs[1], inputs[2], inputs[3]));
    bn->saved.reserve(PyTuple_GET_SIZE(saved));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(saved); ++i) {
      PyObject* t = PyTuple_GET_ITEM(saved, i);
      bn->saved.emplace_back(t == Py_None ? at::Tensor() : THPVariable_Unpack(t), /*is_output=*/false);
    }
    bn->backward = args[1];
    Py_INCREF(bn->backward);
    bn->state = PyTuple_GET_ITEM(out, 2);
    Py_INCREF(bn->state);
    torch::autograd::set_history(THPVariable_Unpack(y), node);
  }
  Py_DECREF(out);
  return y;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(apply)), METH_FASTCALL,
     "apply(forward, backward, x, weight, bias, residual, inputs) -> y (see bnfast/csrc/autograd_node.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_bnfast_autograd", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__bnfast_autograd() { return PyModule_Create(&module_def); }
