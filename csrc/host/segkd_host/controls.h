// Test controls of the host execution layer, bound into segkd_kernels._cuda_host only.
#pragma once

#include <pybind11/pybind11.h>

#include <map>
#include <stdexcept>
#include <string>

#include "runtime.h"

namespace segkd_host {

inline const std::map<std::string, int>& attribute_names() {
  static const std::map<std::string, int> names = {
      {"multiprocessor_count", cudaDevAttrMultiProcessorCount},
      {"max_shared_memory_per_block_optin", cudaDevAttrMaxSharedMemoryPerBlockOptin},
      {"max_shared_memory_per_block", cudaDevAttrMaxSharedMemoryPerBlock},
      {"max_threads_per_block", cudaDevAttrMaxThreadsPerBlock},
      {"max_grid_dim_x", cudaDevAttrMaxGridDimX},
      {"max_grid_dim_y", cudaDevAttrMaxGridDimY},
      {"max_grid_dim_z", cudaDevAttrMaxGridDimZ},
      {"compute_capability_major", cudaDevAttrComputeCapabilityMajor},
      {"compute_capability_minor", cudaDevAttrComputeCapabilityMinor},
      {"l2_cache_size", cudaDevAttrL2CacheSize},
  };
  return names;
}

inline int attribute_code(const std::string& name) {
  auto it = attribute_names().find(name);
  if (it == attribute_names().end()) throw std::invalid_argument("unknown device attribute: " + name);
  return it->second;
}

inline void bind_controls(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("HOST_EXECUTION") = true;
  m.def("host_set_seed", &set_seed, py::arg("seed"),
        "Seed of the random thread and block order (every launch draws from one generator).");
  m.def("host_set_attribute", [](const std::string& name, int value) { set_attribute(attribute_code(name), value); },
        py::arg("name"), py::arg("value"), "Overrides a device attribute the launchers query.");
  m.def("host_get_attribute", [](const std::string& name) { return attribute(attribute_code(name)); },
        py::arg("name"));
  m.def("host_reset", [] {
    reset_attributes();
    std::lock_guard<std::recursive_mutex> lock(state().mutex);
    state().poison = true;
    state().stats = Stats{};
    state().record_only = false;
    state().records.clear();
    state().sticky_error = state().last_error = cudaSuccess;
  }, "Default attributes, poisoning on, recording off, counters and pending errors cleared.");
  m.def("host_set_poison", [](bool on) { state().poison = on; }, py::arg("on"),
        "Fill shared memory with 0xff bytes at every block start (default on).");
  m.def("host_stats", [] {
    const Stats s = state().stats;
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["barriers"] = s.barriers;
    d["collectives"] = s.collectives;
    return d;
  }, "Counters since host_reset: launches, blocks, threads, barriers, warp collectives.");
  m.def("host_set_record_only", [](bool on) {
    std::lock_guard<std::recursive_mutex> lock(state().mutex);
    state().record_only = on;
    state().records.clear();
  }, py::arg("on"), "Record launches (name, grid, block, dynamic smem, pointer arguments) instead of running them.");
  m.def("host_records", [] {
    std::lock_guard<std::recursive_mutex> lock(state().mutex);
    py::list out;
    for (const LaunchRecord& r : state().records) {
      py::dict d;
      d["name"] = r.name;
      d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
      d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
      d["smem"] = r.smem;
      py::list ptrs;
      for (const PointerArg& p : r.pointers) ptrs.append(py::make_tuple(p.address, p.writes));
      d["pointers"] = ptrs;
      out.append(d);
    }
    return out;
  }, "The launches recorded since host_set_record_only(True), in order.");
  m.def("host_attribute_names", [] {
    py::list l;
    for (const auto& kv : attribute_names()) l.append(kv.first);
    return l;
  });
}

}  // namespace segkd_host
