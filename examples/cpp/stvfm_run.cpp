// Run an ST-VFM AOTInductor package (ENGINE_DIR/model.pt2) on .npy inputs and write y as .npy.
//
//   stvfm_run MODEL.pt2 OUT.npy X.npy [TOD.npy DOW.npy]
//
// x: float32 [B, T, C, H, W]; tod, dow: int64 [B, T] (only for a model built with steps_per_day > 0);
// y: float32 [B, T_out, C, H, W]. Any batch from 1 to the engine's max batch. The .npy reader handles
// what numpy.save writes for C-ordered little-endian float32 / int64 arrays.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Npy {
  std::string descr;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

std::string header_value(const std::string& header, const std::string& key) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header lacks '" + key + "'");
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  auto end = header[at] == '(' ? header.find(')', at) + 1
           : header[at] == '\'' ? header.find('\'', at + 1) + 1 : header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

Npy read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(header.data(), header_len);
  Npy npy;
  auto descr = header_value(header, "descr");
  npy.descr = descr.substr(1, descr.size() - 2);
  if (header_value(header, "fortran_order") != "False") throw std::runtime_error(path + ": Fortran order unsupported");
  std::string shape = header_value(header, "shape");
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(d));
  npy.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return npy;
}

torch::Tensor npy_tensor(const std::string& path) {
  Npy npy = read_npy(path);
  torch::Dtype dtype;
  if (npy.descr == "<f4") dtype = torch::kFloat32;
  else if (npy.descr == "<i8") dtype = torch::kInt64;
  else throw std::runtime_error(path + ": dtype " + npy.descr + " unsupported (expected <f4 or <i8)");
  auto t = torch::empty(npy.shape, torch::TensorOptions().dtype(dtype));
  if (static_cast<size_t>(t.nbytes()) != npy.data.size())
    throw std::runtime_error(path + ": data size does not match its shape");
  std::memcpy(t.data_ptr(), npy.data.data(), npy.data.size());
  return t;
}

void write_npy(const std::string& path, const torch::Tensor& y) {
  auto t = y.to(torch::kCPU, torch::kFloat32).contiguous();
  std::string shape = "(";  // Python's tuple repr: "(3, 1, 2)", "(7,)"
  for (int64_t i = 0; i < t.dim(); ++i) shape += std::to_string(t.size(i)) + (i + 1 < t.dim() ? ", " : "");
  shape += t.dim() == 1 ? ",)" : ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  uint16_t len = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(t.data_ptr()), t.nbytes());
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 6) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OUT.npy X.npy [TOD.npy DOW.npy]\n";
    return 2;
  }
  try {
    std::vector<torch::Tensor> inputs;
    for (int i = 3; i < argc; ++i) inputs.push_back(npy_tensor(argv[i]));
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<torch::Tensor> outputs = loader.run(inputs);
    write_npy(argv[2], outputs.at(0));
    std::cout << "y " << outputs.at(0).sizes() << " -> " << argv[2] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "stvfm_run: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
