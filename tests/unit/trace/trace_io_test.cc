// Trace readers and writer: round trips, and every malformed input answered by an error that names
// the file and the line (JSONL) or the request (binary).
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/trace/trace.h"
#include "moex/trace/trace_writer.h"

namespace moex {
namespace {

class TraceIo : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("moex_trace_io_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  // Expects read_trace(path) to throw E with every one of `parts` in its message.
  template <typename E>
  void expect_error(const std::string& path, std::vector<std::string> parts) {
    try {
      read_trace(path);
      FAIL() << "expected an error reading " << path;
    } catch (const E& e) {
      for (const std::string& part : parts)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "message: " << e.what() << "\nmissing: " << part;
    }
  }

  std::filesystem::path dir_;
};

const char* kGoodLine =
    R"({"model":"m","num_layers":2,"num_experts":4,"top_k":2,"request_id":"r0","tokens":[[[0,1],[2,3]],[[1,2],[3,0]]],"gate_weights":[[[0.75,0.25],[0.5,0.5]],[[0.625,0.375],[0.875,0.125]]],"token_ids":[17,42]})";

TEST_F(TraceIo, ReadsTheSharedJsonlFormat) {
  std::string path = write("t.jsonl", std::string(kGoodLine) + "\n\n" +
                                          R"({"num_layers":2,"num_experts":4,"top_k":2,"tokens":[[[3,2],[1,0]]]})" + "\n");
  Trace trace = read_trace(path);
  EXPECT_EQ(trace.model, "m");
  ASSERT_EQ(trace.requests.size(), 2u);
  EXPECT_EQ(trace.requests[0].id, "r0");
  EXPECT_EQ(trace.requests[1].id, "line3");
  EXPECT_EQ(trace.num_tokens(), 3);
  auto ids = trace.experts(trace.requests[0], 1, 1);
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.end()), (std::vector<int32_t>{3, 0}));
  EXPECT_FLOAT_EQ(trace.weights(trace.requests[0], 1, 0)[1], 0.375f);
  EXPECT_TRUE(trace.weights(trace.requests[1], 0, 0).empty());
  EXPECT_FALSE(trace.has_gate_weights());  // only one of two requests has them
}

TEST_F(TraceIo, JsonlErrorsNameFileAndLine) {
  std::string good = std::string(kGoodLine) + "\n";
  expect_error<FormatError>(write("a.jsonl", good + "{not json\n"), {"a.jsonl:2", "not valid JSON"});
  expect_error<FormatError>(
      write("b.jsonl", good + R"({"num_layers":2,"num_experts":4,"top_k":2,"tokens":[[[0,1],[2]]]})" + "\n"),
      {"b.jsonl:2", "\"tokens\"[0][1]", "top_k = 2", "[2]"});
  expect_error<FormatError>(
      write("c.jsonl", R"({"num_layers":2,"num_experts":4,"top_k":2,"tokens":[[[0,9],[2,3]]]})"),
      {"c.jsonl:1", "token 0 layer 0", "expert id 9 outside [0, 4)"});
  expect_error<FormatError>(
      write("d.jsonl", R"({"num_layers":2,"num_experts":4,"top_k":2,"tokens":[[[1,1],[2,3]]]})"),
      {"d.jsonl:1", "expert 1 listed twice"});
  expect_error<FormatError>(write("e.jsonl", good + R"({"num_layers":3,"num_experts":4,"top_k":2,"tokens":[]})"),
                            {"e.jsonl:2", "3/4/2", "2/4/2"});
  expect_error<FormatError>(write("f.jsonl", R"({"num_layers":2,"num_experts":4,"tokens":[]})"),
                            {"f.jsonl:1", "missing field \"top_k\""});
  expect_error<FormatError>(
      write("g.jsonl",
            R"({"num_layers":1,"num_experts":4,"top_k":1,"tokens":[[[0]],[[1]]],"gate_weights":[[[1.0]]]})"),
      {"g.jsonl:1", "\"gate_weights\" has 1 tokens, \"tokens\" has 2"});
  expect_error<FormatError>(
      write("h.jsonl", R"({"num_layers":1,"num_experts":4,"top_k":1,"tokens":[[[0]]],"token_ids":[1,2]})"),
      {"h.jsonl:1", "\"token_ids\" must be an array of 1 integers"});
  expect_error<FormatError>(write("i.jsonl", "\n"), {"i.jsonl", "no requests"});
  expect_error<IoError>((dir_ / "missing.jsonl").string(), {"missing.jsonl", "cannot open"});
}

TEST_F(TraceIo, BinaryRoundTripKeepsEverything) {
  Trace trace = read_trace(write("t.jsonl", kGoodLine));
  std::string bin = (dir_ / "t.moext").string();
  write_moex_trace(trace, bin);
  Trace back = read_trace(bin);
  EXPECT_EQ(back.model, "m");
  EXPECT_EQ(back.num_layers, 2);
  EXPECT_EQ(back.num_experts, 4);
  EXPECT_EQ(back.top_k, 2);
  ASSERT_EQ(back.requests.size(), 1u);
  EXPECT_EQ(back.requests[0].id, "r0");
  EXPECT_EQ(back.requests[0].expert_ids, trace.requests[0].expert_ids);
  EXPECT_EQ(back.requests[0].token_ids, (std::vector<int32_t>{17, 42}));
  // Weights are stored as f16: these values are exact in f16.
  EXPECT_EQ(back.requests[0].gate_weights, trace.requests[0].gate_weights);
  // And back to JSONL.
  std::string jsonl = (dir_ / "back.jsonl").string();
  write_jsonl_trace(back, jsonl);
  EXPECT_EQ(read_trace(jsonl).requests[0].expert_ids, trace.requests[0].expert_ids);
}

TEST_F(TraceIo, WriterTakesRecordsInAnyOrderAndWideIds) {
  std::string path = (dir_ / "w.moext").string();
  TraceInfo info;
  info.model = "wide";
  info.num_layers = 2;
  info.num_experts = 300;  // two-byte ids
  info.top_k = 1;
  {
    TraceWriter writer(path, info);
    auto a = writer.begin_request("a");
    auto b = writer.begin_request("b");  // interleaved requests, as in a batch
    writer.record(b, 1, 0, std::vector<int32_t>{299}, {});
    writer.record(a, 0, 1, std::vector<int32_t>{7}, {});
    writer.record(a, 1, 1, std::vector<int32_t>{8}, {});
    writer.record(b, 0, 0, std::vector<int32_t>{256}, {});
    writer.record(a, 0, 0, std::vector<int32_t>{5}, {});
    writer.record(a, 1, 0, std::vector<int32_t>{6}, {});
    writer.end_request(b);
    writer.end_request(a);
  }  // the destructor closes
  Trace trace = read_trace(path);
  ASSERT_EQ(trace.requests.size(), 2u);
  EXPECT_EQ(trace.requests[0].id, "b");
  EXPECT_EQ(trace.requests[0].expert_ids, (std::vector<int32_t>{256, 299}));
  EXPECT_EQ(trace.requests[1].expert_ids, (std::vector<int32_t>{5, 6, 7, 8}));
}

TEST_F(TraceIo, WriterRejectsAnIncompleteRequest) {
  TraceInfo info;
  info.model = "m";
  info.num_layers = 2;
  info.num_experts = 4;
  info.top_k = 1;
  TraceWriter writer((dir_ / "x.moext").string(), info);
  auto r = writer.begin_request("r");
  writer.record(r, 0, 0, std::vector<int32_t>{1}, {});
  writer.record(r, 1, 1, std::vector<int32_t>{2}, {});
  try {
    writer.end_request(r);
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("request \"r\": token 0 has no routing recorded for layer 1"),
              std::string::npos)
        << e.what();
  }
}

// Pre-gating logits (layers 1.. of each token, num_experts each) survive JSONL -> binary -> JSONL; values
// exact in f16 come back exactly, layer 0 reads as zeros, and a request missing some is refused.
TEST_F(TraceIo, PregateLogitsRoundTripAndAreCheckedForCompleteness) {
  const std::string line =
      R"({"model":"m","num_layers":2,"num_experts":4,"top_k":2,"request_id":"r0","tokens":[[[0,1],[2,3]],[[1,2],[3,0]]],)"
      R"("pregate_logits":[[[0,0,0,0],[0.5,-1.25,3,2]],[[0,0,0,0],[-0.75,8,0.125,1]]]})";
  Trace trace = read_trace(write("p.jsonl", line));
  ASSERT_TRUE(trace.has_pregate_logits());
  EXPECT_EQ(std::vector<float>(trace.pregate(trace.requests[0], 1, 1).begin(), trace.pregate(trace.requests[0], 1, 1).end()),
            (std::vector<float>{-0.75f, 8.f, 0.125f, 1.f}));
  std::string bin = (dir_ / "p.moext").string();
  write_moex_trace(trace, bin);
  Trace back = read_trace(bin);
  ASSERT_TRUE(back.has_pregate_logits());
  EXPECT_EQ(back.requests[0].pregate_logits, trace.requests[0].pregate_logits);
  std::string jsonl = (dir_ / "p_back.jsonl").string();
  write_jsonl_trace(back, jsonl);
  EXPECT_EQ(read_trace(jsonl).requests[0].pregate_logits, trace.requests[0].pregate_logits);
  // Truncation inside the logits is caught like any other.
  std::ifstream in(bin, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  expect_error<FormatError>(write("pcut.moext", bytes.substr(0, bytes.size() - 20)), {"pcut.moext", "truncated"});
  // A JSONL row of the wrong width names the field.
  expect_error<FormatError>(
      write("pbad.jsonl", R"({"num_layers":2,"num_experts":4,"top_k":2,"tokens":[[[0,1],[2,3]]],"pregate_logits":[[[0,0,0,0],[1,2]]]})"),
      {"pbad.jsonl:1", "\"pregate_logits\"[0][1] must hold num_experts = 4 values"});
  // The writer refuses a request whose token lacks a layer's logits.
  TraceInfo info;
  info.num_layers = 3;
  info.num_experts = 4;
  info.top_k = 1;
  info.with_pregate_logits = true;
  TraceWriter writer((dir_ / "w.moext").string(), info);
  auto request = writer.begin_request("q");
  for (int32_t layer = 0; layer < 3; ++layer) writer.record(request, layer, 0, std::vector<int32_t>{layer}, {});
  writer.record_pregate(request, 1, 0, std::vector<float>{1, 2, 3, 4});
  try {
    writer.end_request(request);
    FAIL() << "expected an error for the missing layer-2 logits";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("token 0 has no pre-gating logits for layer 2"), std::string::npos) << e.what();
  }
}

TEST_F(TraceIo, BinaryErrorsNameWhatIsWrong) {
  Trace trace = read_trace(write("t.jsonl", kGoodLine));
  std::string bin = (dir_ / "t.moext").string();
  write_moex_trace(trace, bin);
  std::ifstream in(bin, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Cut inside the request's token data.
  expect_error<FormatError>(write("cut.moext", bytes.substr(0, bytes.size() - 30)),
                            {"cut.moext", "truncated in request 0 (\"r0\")"});
  // Cut inside the end record.
  expect_error<FormatError>(write("end.moext", bytes.substr(0, bytes.size() - 4)), {"end.moext", "truncated", "end record"});
  // An expert id out of range: the first id byte of token 0 follows tag, id, token count and token id.
  std::string bad = bytes;
  size_t header_len = static_cast<uint8_t>(bad[8]) | (static_cast<uint8_t>(bad[9]) << 8);
  size_t first_id = 8 + 4 + header_len + 1 + 2 + 2 + 4 + 4;
  bad[first_id] = 9;
  expect_error<FormatError>(write("bad.moext", bad), {"bad.moext", "request 0 (\"r0\")", "expert id 9 outside [0, 4)"});
  // A count in the end record that disagrees.
  std::string lie = bytes;
  lie[lie.size() - 16] = 5;
  expect_error<FormatError>(write("lie.moext", lie), {"lie.moext", "end record says 5 requests"});
}

}  // namespace
}  // namespace moex
