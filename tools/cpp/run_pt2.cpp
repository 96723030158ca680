// Runs a voxsparse detector packaged by `tools/export.py format=pt2 sparse_ops=torch` from C++,
// without Python: libtorch's AOTInductor package loader, nothing else.
//
//   run_pt2 MODEL.pt2 POINTS.f32 COLUMNS [BATCH_INDEX.i64]
//
// POINTS.f32: N x COLUMNS float32, row-major, little-endian, in the model's point convention
// (x, y, z in metres, then its feature columns). BATCH_INDEX.i64: N int64 frame indices (default: all
// frame 0). Prints one detection per line: frame label score x y z dx dy dz heading [vx vy].
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

template <typename T>
std::vector<T> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot be opened");
  const auto bytes = static_cast<size_t>(in.tellg());
  if (bytes % sizeof(T) != 0)
    throw std::runtime_error(path + ": " + std::to_string(bytes) + " bytes is not a whole number of " +
                             std::to_string(sizeof(T)) + "-byte values");
  std::vector<T> values(bytes / sizeof(T));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes));
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 POINTS.f32 COLUMNS [BATCH_INDEX.i64]\n";
    return 2;
  }
  try {
    const int64_t columns = std::stoll(argv[3]);
    auto values = read_file<float>(argv[2]);
    if (columns < 3 || values.size() % columns != 0)
      throw std::runtime_error(std::string(argv[2]) + ": " + std::to_string(values.size()) +
                               " floats do not form rows of " + std::to_string(columns) + " columns");
    const int64_t n = static_cast<int64_t>(values.size()) / columns;
    auto points = torch::from_blob(values.data(), {n, columns}, torch::kFloat32).clone();
    torch::Tensor batch_index = torch::zeros({n}, torch::kInt64);
    if (argc == 5) {
      auto frames = read_file<int64_t>(argv[4]);
      if (static_cast<int64_t>(frames.size()) != n)
        throw std::runtime_error(std::string(argv[4]) + ": " + std::to_string(frames.size()) +
                                 " frame indices for " + std::to_string(n) + " points");
      batch_index = torch::from_blob(frames.data(), {n}, torch::kInt64).clone();
    }
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto outputs = loader.run({points, batch_index});  // boxes, scores, labels, frame
    const auto boxes = outputs.at(0).contiguous();
    const auto scores = outputs.at(1), labels = outputs.at(2), frame = outputs.at(3);
    for (int64_t i = 0; i < boxes.size(0); ++i) {
      std::printf("%lld %lld %.9g", static_cast<long long>(frame[i].item<int64_t>()),
                  static_cast<long long>(labels[i].item<int64_t>()), scores[i].item<float>());
      for (int64_t j = 0; j < boxes.size(1); ++j) std::printf(" %.9g", boxes[i][j].item<float>());
      std::printf("\n");
    }
  } catch (const std::exception& error) {
    std::cerr << "run_pt2: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
