// Scores raw rows with the AOTInductor package that `engagerec export --aoti` writes
// (model_raw_fp32.aoti.pt2), from C++ alone: no Python, no engagerec, no torchrec.
//
//   score_raw PACKAGE INPUTS OUTPUT [--time CALLS]
//
// INPUTS holds the program's input tensors in the order inputs.json lists under
// raw.aoti.inputs (torch.save of a list of tensors in Python, torch::pickle_save in C++):
// raw ids, raw numbers, each row's recent views and outcomes, and the features the client
// encodes. OUTPUT gets the [rows, tasks] float32 predictions (read it with torch.load), columns
// in inputs.json's task order. A serving process builds the same tensors from its requests
// (torch::from_blob over its arrays) and calls loader.run() per batch. With --time CALLS it
// then calls the package CALLS more times on the same inputs and prints the latency per call
// (p50 and p99, milliseconds) as one JSON line (benchmarks/serving_latency.py reads it).
//
// Build: `make cpp-client` (g++ against the libtorch inside the installed torch wheel).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error(std::string("cannot read ") + path);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// p-th percentile (0..100) of sorted values, by the nearest rank
double percentile(const std::vector<double>& sorted, double p) {
  const size_t rank = static_cast<size_t>(p / 100.0 * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(rank, sorted.size() - 1)];
}

}  // namespace

int main(int argc, char** argv) {
  const bool timed = argc == 6 && std::string(argv[4]) == "--time";
  const int calls = timed ? std::atoi(argv[5]) : 0;
  if ((argc != 4 && !timed) || (timed && calls < 1)) {
    std::cerr << "usage: " << argv[0] << " PACKAGE INPUTS OUTPUT [--time CALLS (1 or more)]\n";
    return 2;
  }
  try {
    const c10::IValue saved = torch::pickle_load(read_file(argv[2]));
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& value : saved.toListRef()) {
      inputs.push_back(value.toTensor());
    }
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    c10::InferenceMode no_autograd;
    std::vector<at::Tensor> outputs = loader.run(inputs);
    std::vector<char> bytes = torch::pickle_save(outputs.at(0));
    std::ofstream out(argv[3], std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      throw std::runtime_error(std::string("cannot write ") + argv[3]);
    }
    std::cout << "scored " << outputs.at(0).size(0) << " rows into " << argv[3] << "\n";
    if (timed) {
      std::vector<double> milliseconds;
      for (int i = 0; i < calls; ++i) {
        const auto start = std::chrono::steady_clock::now();
        loader.run(inputs);
        const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
        milliseconds.push_back(took.count());
      }
      std::sort(milliseconds.begin(), milliseconds.end());
      std::cout << "{\"calls\": " << calls << ", \"p50_ms\": " << percentile(milliseconds, 50)
                << ", \"p99_ms\": " << percentile(milliseconds, 99) << "}\n";
    }
  } catch (const std::exception& error) {
    std::cerr << "score_raw: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
